"""Device mesh and shardings: one `("data", "fsdp")` mesh for training and sampling.

The batch is split over both axes (every device sees different samples).
Parameters are replicated when `fsdp == 1`; otherwise each large leaf is
split along its largest axis divisible by `fsdp` (ZeRO-3 style: XLA gathers
them for use and reduce-scatters the gradients). Multi-host runs call
`jax.distributed.initialize()` first; each process then feeds its own slice of
the global batch (`global_batch`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Leaves smaller than this stay replicated under FSDP: splitting biases and
# norms costs more in collectives than it saves in memory.
FSDP_MIN_SIZE = 2**14


def maybe_initialize_distributed() -> None:
    """Join a multi-process run when launched as one (JAX's env vars or ours).

    `CN_JAX_COORDINATOR` (host:port), `CN_JAX_NUM_PROCESSES`, `CN_JAX_PROCESS_ID`
    select the processes explicitly (e.g. several CPU processes on one
    machine); otherwise `jax.distributed.initialize()` auto-detects cluster
    environments (SLURM, TPU pods, ...) and is skipped on a single process.
    """
    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get("CN_JAX_COORDINATOR")
    if coordinator:
        # CPU processes need a collectives backend to talk to each other (GPUs
        # use NCCL; this setting only concerns the CPU client).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["CN_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["CN_JAX_PROCESS_ID"]),
        )
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS"):
        jax.distributed.initialize()


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over all devices (global, every process)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
    return jax.make_mesh(
        (n // fsdp, fsdp), ("data", "fsdp"), (AxisType.Auto, AxisType.Auto), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(mesh: Mesh, tree: Any) -> Any:
    """Replicated leaves, or FSDP-split large leaves when the mesh has fsdp > 1."""
    fsdp = mesh.shape["fsdp"]

    def leaf_sharding(x):
        shape = getattr(x, "shape", ())
        if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
            return replicated(mesh)
        axes = sorted(range(len(shape)), key=lambda a: -shape[a])
        for a in axes:
            if shape[a] % fsdp == 0:
                spec = [None] * len(shape)
                spec[a] = "fsdp"
                return NamedSharding(mesh, P(*spec))
        return replicated(mesh)

    return jax.tree_util.tree_map(leaf_sharding, tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> globally sharded arrays."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }
