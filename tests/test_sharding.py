"""cn_jax.train.sharding: when a run joins several processes (environments
monkeypatched, no real cluster; `jax.distributed.initialize` recorded, not run),
and the multi-host mesh's FSDP groups (fake devices). The real two-process runs
are in test_train_loop.py."""

import dataclasses

import jax
import numpy as np
import pytest
from jax._src import clusters

from cn_jax.train import sharding as shd

# Every variable a launch is detected by: cleared before each test.
LAUNCH_VARS = (
    *shd.CN_JAX_VARS,
    *shd.WORLD_SIZE_VARS,
    "JAX_COORDINATOR_ADDRESS",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_NUM_NODES",
    "KUBERNETES_SERVICE_HOST",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
)


@pytest.fixture
def env(monkeypatch):
    """A single-process environment; `calls` records jax.distributed.initialize's
    arguments and `processes` sets what jax.process_count() then says."""
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    rec = {"calls": [], "processes": 1, "error": None}

    def initialize(*args, **kwargs):
        rec["calls"].append(kwargs)
        if rec["error"] is not None:
            raise rec["error"]

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax, "process_count", lambda: rec["processes"])
    monkeypatch.setattr(jax.config, "update", lambda *a: rec.setdefault("config", []).append(a))
    return rec


def _ompi(monkeypatch, size, uri=True):
    if uri:  # Open MPI 4's mpirun; Open MPI 5 sets no such URI
        monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.0.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", str(size))
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")


def _slurm(monkeypatch, ntasks):
    for k, v in {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NUM_NODES": str(ntasks),
    }.items():
        monkeypatch.setenv(k, v)


def test_single_process_environment_does_not_initialize(env):
    assert shd.detect_launch() is None
    shd.maybe_initialize_distributed()
    assert env["calls"] == []


@pytest.mark.parametrize("launcher", [_ompi, _slurm])
def test_one_process_cluster_does_not_initialize(env, monkeypatch, launcher):
    launcher(monkeypatch, 1)
    shd.maybe_initialize_distributed()
    assert env["calls"] == []


@pytest.mark.parametrize("launcher, source", [(_ompi, "OmpiCluster"), (_slurm, "SlurmCluster")])
def test_cluster_jax_detects_initializes(env, monkeypatch, launcher, source):
    """mpirun / srun with 2 processes: JAX's own cluster type says so; JAX reads it."""
    launcher(monkeypatch, 2)
    assert shd.detect_launch() == shd.Launch(source, 2)
    env["processes"] = 2
    shd.maybe_initialize_distributed()
    assert env["calls"] == [{}]  # jax.distributed.initialize() auto-detects


def test_several_processes_left_alone_are_refused(env, monkeypatch):
    """The environment shows 2 processes; JAX still runs one after initialize()."""
    _ompi(monkeypatch, 2)
    with pytest.raises(ValueError, match="OmpiCluster.* 2 processes, but JAX runs 1") as e:
        shd.maybe_initialize_distributed()
    assert "\n" not in str(e.value)


def test_world_size_jax_cannot_read_is_refused(env, monkeypatch):
    """Open MPI 5 (no hnp URI): JAX finds no cluster and cannot initialise; the
    run stops with one line instead of training 2 independent runs."""
    _ompi(monkeypatch, 2, uri=False)
    assert shd.detect_launch() == shd.Launch("OMPI_COMM_WORLD_SIZE", 2)
    env["error"] = ValueError("coordinator_address should be defined.")
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_SIZE.*coordinator_address") as e:
        shd.maybe_initialize_distributed()
    assert len(env["calls"]) == 1
    assert "\n" not in str(e.value)


def test_uncountable_cluster_initializes_and_needs_several(env, monkeypatch):
    """A cluster JAX detects but cannot count (a Kubernetes pod outside a Job):
    initialise as JAX would; one process afterwards is refused."""

    def fail():
        raise RuntimeError("In K8s, cluster automatic bootstrap only supports Job/JobSet.")

    k8s = next(c for c in clusters.ClusterEnv._cluster_types if c.__name__ == "K8sCluster")
    monkeypatch.setattr(k8s, "is_env_present", classmethod(lambda cls: True))
    monkeypatch.setattr(k8s, "get_process_count", classmethod(lambda cls: fail()))
    assert shd.detect_launch() == shd.Launch("K8sCluster", None)
    with pytest.raises(ValueError, match=r"K8sCluster\) shows several processes"):
        shd.maybe_initialize_distributed()
    env["processes"] = 3
    shd.maybe_initialize_distributed()
    assert len(env["calls"]) == 2
    # The explicit escape: one process whatever the cluster says.
    monkeypatch.setenv("CN_JAX_NUM_PROCESSES", "1")
    assert shd.detect_launch() is None


def test_explicit_variables_initialize_over_gloo(env, monkeypatch):
    monkeypatch.setenv("CN_JAX_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("CN_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("CN_JAX_PROCESS_ID", "1")
    _ompi(monkeypatch, 4)  # ours win over a cluster's
    env["processes"] = 2
    shd.maybe_initialize_distributed()
    assert env["calls"] == [
        {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    ]
    assert env["config"] == [("jax_cpu_collectives_implementation", "gloo")]


def test_incomplete_explicit_variables_are_refused(env, monkeypatch):
    monkeypatch.setenv("CN_JAX_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="CN_JAX_NUM_PROCESSES, CN_JAX_PROCESS_ID not"):
        shd.maybe_initialize_distributed()
    assert env["calls"] == []


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def _processes(grid: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index)(grid)


@pytest.mark.parametrize("fsdp", [1, 2, 4])
def test_hybrid_grid_keeps_each_fsdp_group_on_one_host(fsdp):
    # 2 hosts x 4 devices, listed interleaved: the grid must not follow list order.
    devices = [FakeDevice(id=i, process_index=i % 2) for i in range(8)]
    grid = shd.hybrid_grid(fsdp, devices)
    assert grid.shape == (8 // fsdp, fsdp)
    procs = _processes(grid)
    assert (procs == procs[:, :1]).all()  # an FSDP group: one host
    # Hosts in order along "data": each process's batch rows are contiguous.
    np.testing.assert_array_equal(procs[:, 0], np.repeat([0, 1], 4 // fsdp))
    assert sorted(d.id for d in grid.flat) == list(range(8))


def test_hybrid_grid_refuses_fsdp_across_hosts():
    devices = [FakeDevice(id=i, process_index=i // 2) for i in range(8)]  # 4 hosts x 2
    with pytest.raises(ValueError, match="mesh.fsdp=4 does not divide the 2 devices of each"):
        shd.hybrid_grid(4, devices)
    uneven = [FakeDevice(id=i, process_index=int(i > 0)) for i in range(4)]
    with pytest.raises(ValueError, match="different numbers of devices"):
        shd.hybrid_grid(1, uneven)


def test_single_process_mesh_is_unchanged():
    mesh = shd.make_mesh(1)
    assert mesh.axis_names == ("data", "fsdp")
    assert mesh.devices.shape == (jax.device_count(), 1)
    with pytest.raises(ValueError, match="mesh.fsdp=3 does not divide"):
        shd.make_mesh(3, [FakeDevice(0, 0), FakeDevice(1, 0)])
