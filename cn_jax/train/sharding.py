"""Device mesh and shardings: one `("data", "fsdp")` mesh for training and sampling.

The batch is split over both axes (every device sees different samples).
Parameters are replicated when `fsdp == 1`; otherwise each large leaf is
split along its largest axis divisible by `fsdp` (ZeRO-3 style: XLA gathers
them for use and reduce-scatters the gradients). Across hosts the mesh is
hybrid: each FSDP group is the devices of one process (fast links within a
host), data parallelism spans the processes. Multi-host runs call
`jax.distributed.initialize()` first (`maybe_initialize_distributed`); each
process then feeds its own slice of the global batch (`global_batch`), and
every process runs every program on the global arrays (`to_host` brings a
result back to each of them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("cn_jax.train")

# Leaves smaller than this stay replicated under FSDP: splitting biases and
# norms costs more in collectives than it saves in memory.
FSDP_MIN_SIZE = 2**14

# Our explicit multi-process launch (e.g. several CPU processes on one machine).
CN_JAX_VARS = ("CN_JAX_COORDINATOR", "CN_JAX_NUM_PROCESSES", "CN_JAX_PROCESS_ID")
# Launchers' world sizes that JAX's cluster types do not read (Open MPI 5 sets no
# OMPI_MCA_orte_hnp_uri; MPICH and Intel MPI set PMI_SIZE): several processes
# there with no cluster JAX knows is refused, not trained as independent runs.
WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the environment says this program was launched.

    Attributes:
      source: what said so ("CN_JAX_*", "JAX_COORDINATOR_ADDRESS", or the name
        of one of JAX's cluster types, e.g. "OmpiCluster", "SlurmCluster").
      num_processes: how many processes it names; None where it could not say.
    """

    source: str
    num_processes: int | None


def detect_launch() -> Launch | None:
    """The multi-process launch this environment shows, or None (one process).

    Our `CN_JAX_*` variables first; then JAX's `JAX_COORDINATOR_ADDRESS`; then
    each cluster type `jax.distributed.initialize()` auto-detects (Open MPI,
    SLURM, GKE and GCE TPU slices, Kubernetes jobs; the opt-in mpi4py one is
    left out, as JAX leaves it out), asked through its own `is_env_present()` and
    `get_process_count()`, so this follows JAX's detection as it changes; last
    the world sizes of launchers JAX cannot read (`WORLD_SIZE_VARS`).
    `CN_JAX_NUM_PROCESSES=1` alone says "one process": nothing is asked.
    """
    env = os.environ
    given = [k for k in CN_JAX_VARS if env.get(k)]
    if given == ["CN_JAX_NUM_PROCESSES"] and _int_var("CN_JAX_NUM_PROCESSES") == 1:
        return None
    if given:
        missing = [k for k in CN_JAX_VARS if k not in given]
        if missing:
            raise ValueError(
                f"{', '.join(given)} set but {', '.join(missing)} not: a multi-process "
                f"run needs all of {', '.join(CN_JAX_VARS)}"
            )
        return Launch("CN_JAX_*", _int_var("CN_JAX_NUM_PROCESSES"))
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return Launch("JAX_COORDINATOR_ADDRESS", None)
    from jax._src import clusters  # the cluster types jax.distributed.initialize() tries

    for cluster in clusters.ClusterEnv._cluster_types:
        if cluster.opt_in_only_method or not cluster.is_env_present():
            continue
        try:
            count = int(cluster.get_process_count())
        except Exception as e:  # e.g. a Kubernetes pod outside a Job: JAX cannot count
            log.warning("%s detected but its process count is unknown: %s", cluster.__name__, e)
            return Launch(cluster.__name__, None)
        return None if count == 1 else Launch(cluster.__name__, count)
    for name in WORLD_SIZE_VARS:
        if env.get(name) and _int_var(name) > 1:
            return Launch(name, _int_var(name))
    return None


def _int_var(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def maybe_initialize_distributed() -> None:
    """Join a multi-process run when the environment shows one (`detect_launch`).

    `CN_JAX_COORDINATOR` (host:port), `CN_JAX_NUM_PROCESSES`, `CN_JAX_PROCESS_ID`
    select the processes explicitly (CPU processes then talk over gloo);
    otherwise `jax.distributed.initialize()` reads the cluster (mpirun, SLURM,
    a TPU slice, a Kubernetes job, `JAX_COORDINATOR_ADDRESS`). A run the
    environment says has several processes but that ends up with one (a failed
    or partial initialisation) is refused: its hosts would otherwise train as
    independent runs into one workdir. `CN_JAX_NUM_PROCESSES=1` runs one
    process whatever the cluster says.

    Raises:
      ValueError: incomplete `CN_JAX_*` variables, or several processes shown
        and the initialisation failed or left this one alone.
    """
    if jax.distributed.is_initialized():
        return
    launch = detect_launch()
    if launch is None or launch.num_processes == 1:
        return
    try:
        if launch.source == "CN_JAX_*":
            # CPU processes need a collectives backend to talk to each other (GPUs
            # use NCCL; this setting only concerns the CPU client).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(
                coordinator_address=os.environ["CN_JAX_COORDINATOR"],
                num_processes=launch.num_processes,
                process_id=_int_var("CN_JAX_PROCESS_ID"),
            )
        else:
            jax.distributed.initialize()
    except Exception as e:
        raise ValueError(
            f"{_shown(launch)}, but jax.distributed.initialize() failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            f"(set {', '.join(CN_JAX_VARS)} or JAX_COORDINATOR_ADDRESS; "
            "CN_JAX_NUM_PROCESSES=1 runs a single process)"
        ) from e
    check_processes(launch)


def check_processes(launch: Launch) -> None:
    """Refuses a run whose environment shows several processes when JAX has one
    (or another count than the environment names)."""
    n = jax.process_count()
    if (launch.num_processes is None and n > 1) or n == launch.num_processes:
        return
    raise ValueError(
        f"{_shown(launch)}, but JAX runs {n} after jax.distributed.initialize(): "
        "refusing to train the hosts as independent runs into one workdir "
        "(set CN_JAX_NUM_PROCESSES=1 to run a single process)"
    )


def _shown(launch: Launch) -> str:
    count = "several" if launch.num_processes is None else str(launch.num_processes)
    return f"the environment ({launch.source}) shows {count} processes"


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all, every process's).

    On one process, `jax.make_mesh` (topology-aware on TPUs); on several,
    `hybrid_grid`: each FSDP group within one host.

    Raises:
      ValueError: `fsdp` does not divide the devices (of each process).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
    axis_types = (AxisType.Auto, AxisType.Auto)
    if len({d.process_index for d in devices}) == 1:
        return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types, devices=devices)
    return Mesh(hybrid_grid(fsdp, devices), ("data", "fsdp"), axis_types=axis_types)


def hybrid_grid(fsdp: int, devices) -> np.ndarray:
    """The (data, fsdp) device array of a multi-process mesh.

    Each row (an FSDP group) is `fsdp` devices of one process, so FSDP's gathers
    and reduce-scatters stay on a host's fast links and only data parallelism's
    gradient all-reduce crosses hosts; processes follow each other along "data"
    (`mesh_utils.create_hybrid_device_mesh` with processes as the granules, each
    host's devices laid out by `create_device_mesh`).

    Raises:
      ValueError: processes with different device counts, or `fsdp` not
        dividing each process's devices.
    """
    per_process: dict[int, int] = {}
    for d in devices:
        per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
    if len(set(per_process.values())) > 1:
        raise ValueError(f"processes have different numbers of devices: {per_process}")
    local = next(iter(per_process.values()))
    if local % fsdp:
        raise ValueError(
            f"mesh.fsdp={fsdp} does not divide the {local} devices of each process: "
            f"an FSDP group stays within one host ({len(per_process)} processes)"
        )
    return mesh_utils.create_hybrid_device_mesh(
        (local // fsdp, fsdp), (len(per_process), 1), devices, process_is_granule=True
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


def to_host(x: jax.Array) -> np.ndarray:
    """All of `x` as a numpy array, on every process.

    A result split over several processes' devices is gathered
    (`process_allgather`, a collective: every process calls this for the same
    array, as every process ran the program that made it)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
