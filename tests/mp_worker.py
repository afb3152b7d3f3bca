"""One process of the multi-process training tests (run by test_train_loop.py).

Environment: CN_JAX_COORDINATOR / CN_JAX_NUM_PROCESSES / CN_JAX_PROCESS_ID for a
multi-process run (unset: a single process), XLA_FLAGS for the device count.
argv: workdir, then config overrides; process 0 writes to $CN_JAX_TEST_OUT (npz)
the last loss and the process of each device of the run's mesh ("data", "fsdp").
The test reads the params from the run's checkpoint."""

import os
import sys

import jax
import numpy as np

from cn_jax.config import load_config
from cn_jax.train.loop import train
from cn_jax.train.sharding import make_mesh, maybe_initialize_distributed


def main() -> None:
    maybe_initialize_distributed()
    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
    config = load_config(tiny, sys.argv[2:])
    last = train(config, sys.argv[1], progress=False)
    if jax.process_index() == 0:
        mesh = make_mesh(config.mesh.fsdp)  # the mesh train() built
        processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
        np.savez(os.environ["CN_JAX_TEST_OUT"], loss=last["loss"], mesh_processes=processes)


if __name__ == "__main__":
    main()
