"""cn_jax.runtime: importing cn_jax changes nothing outside it (no XLA_FLAGS, no JAX
backend started); the XLA flags `configure_host()` sets (the memory-first CPU scheduler
reaches XLA, a flag the user set is kept, nothing changes once JAX has started;
checked on XLA's own buffer count in fresh processes, since XLA reads XLA_FLAGS
once per process) and `release_host_memory` (freed pages leave the resident set)."""

import json
import os
import subprocess
import sys

import pytest

from cn_jax import runtime

FLAG = f"--{runtime.SCHEDULER_FLAG}"
# cn_jax sets its CPU flags only where no accelerator plugin is installed.
cpu_only = pytest.mark.skipif(
    bool(runtime.accelerator_plugins()), reason="an accelerator plugin is installed"
)

# Eight independent matmul chains: the concurrency scheduler keeps their
# intermediates alive at once, the memory-first one finishes each in turn.
_CHILD = """
import json, os, sys
if sys.argv[1] == "start-jax-first":
    import jax.numpy as jnp
    jnp.zeros(1).block_until_ready()
import cn_jax
from jax._src import xla_bridge
started_by_import = xla_bridge.backends_are_initialized()
flags_after_import = os.environ.get("XLA_FLAGS")
if sys.argv[1] != "import-only":
    cn_jax.runtime.configure_host()
import jax, jax.numpy as jnp
def f(x):
    ys = [jnp.sin(x * i) @ x for i in range(8)]
    return sum(jnp.tanh(y) @ y for y in ys)
c = jax.jit(f).lower(jnp.ones((512, 512))).compile()
print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""),
                  "scheduler": cn_jax.runtime.cpu_scheduler(),
                  "started_by_import": started_by_import,
                  "flags_after_import": flags_after_import,
                  "temp": c.memory_analysis().temp_size_in_bytes}))
"""


def _child(xla_flags: str | None, mode: str = "configure-first") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile for real, every time
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_cn_jax_changes_nothing_outside_it():
    """The issue's check: with no XLA_FLAGS, `import cn_jax` leaves it unset and starts
    no JAX backend; the program's scheduler is XLA's default until it opts in."""
    r = _child(None, "import-only")
    assert r["flags_after_import"] is None and r["flags"] == ""
    assert r["started_by_import"] is False
    assert r["scheduler"] == "concurrency"


@cpu_only
def test_memory_first_scheduler_reaches_xla():
    ours = _child(None)
    xla_default = _child(f"{FLAG}=true")
    assert ours["flags"] == f"{FLAG}=false" and ours["scheduler"] == "memory-first"
    assert xla_default["flags"] == f"{FLAG}=true"  # the user's value, untouched
    assert xla_default["scheduler"] == "concurrency"
    # XLA's own count: fewer live temporaries with the memory-first order.
    assert ours["temp"] < xla_default["temp"], (ours, xla_default)


@cpu_only
def test_flags_are_appended_to_the_users():
    r = _child("--xla_force_host_platform_device_count=2")
    assert r["flags"] == f"--xla_force_host_platform_device_count=2 {FLAG}=false"
    assert r["scheduler"] == "memory-first"


@cpu_only
def test_nothing_changes_once_jax_has_started():
    r = _child(None, "start-jax-first")
    assert r["flags"] == "" and r["scheduler"] == "concurrency"
    assert r["temp"] == _child(f"{FLAG}=true")["temp"]


def test_xla_knows_its_flags_only():
    assert runtime.xla_knows(runtime.SCHEDULER_FLAG)
    assert not runtime.xla_knows("xla_cpu_no_such_flag_anywhere")


@pytest.mark.parametrize(
    ("plugins", "started", "known", "expected"),
    [([], False, True, f"--a=1 {FLAG}=false"),  # the CPU install: appended
     (["xla_cuda13"], False, True, "--a=1"),  # a plugin's XLA parses XLA_FLAGS too
     ([], True, True, "--a=1"),  # too late: XLA has read XLA_FLAGS
     ([], False, False, "--a=1")],  # a jaxlib without the flag: XLA would abort on it
)  # fmt: skip
def test_set_default_flags_only_where_safe(monkeypatch, plugins, started, known, expected):
    monkeypatch.setattr(runtime, "_flags_seen", runtime._flags_seen)
    monkeypatch.setenv("XLA_FLAGS", "--a=1")
    monkeypatch.setattr(runtime, "accelerator_plugins", lambda: plugins)
    monkeypatch.setattr(runtime, "_jax_started", lambda: started)
    monkeypatch.setattr(runtime, "xla_knows", lambda flag: known)
    assert runtime.set_default_flags() is (expected != "--a=1")
    assert os.environ["XLA_FLAGS"] == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(f"{FLAG}=false", "memory-first"), (f"{FLAG}=0", "memory-first"),
     (f"{FLAG}=true", "concurrency"), (f"{FLAG}=false {FLAG}=true", "concurrency"),
     ("", "concurrency")],
)  # fmt: skip
def test_cpu_scheduler_reads_the_last_value(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "_flags_seen", flags)
    assert runtime.cpu_scheduler() == expected


_TRIM_CHILD = """
import json
from cn_jax import runtime
def rss_mib():
    line = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
    return int(line.split()[1]) // 1024
chunks = [bytes(100_000) for _ in range(3000)]  # 300 MB in malloc-sized pieces
keep = chunks[-1]  # pins the top of the heap: glibc cannot shrink it by itself
before = rss_mib()
del chunks
freed = rss_mib()
released = runtime.release_host_memory()
print(json.dumps({"before": before, "freed": freed, "after": rss_mib(), "released": released}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_release_host_memory_returns_freed_pages():
    out = subprocess.run([sys.executable, "-c", _TRIM_CHILD], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["released"]:
        pytest.skip("no glibc malloc_trim here")
    assert r["freed"] > r["before"] - 50  # freed, still resident
    assert r["after"] < r["freed"] - 150, r  # handed back (most of the 286 MiB)


def test_release_host_memory_drops_jax_caches_but_keeps_compiled():
    import jax
    import jax.numpy as jnp

    traced = jax.jit(lambda x: x * 2.0)
    traced(jnp.ones(3))  # traced and compiled: cached
    compiled = jax.jit(lambda x: x + 1.0).lower(jnp.ones(3)).compile()
    assert traced._cache_size() == 1
    runtime.release_host_memory()
    assert traced._cache_size() == 1  # the caches stay unless asked
    runtime.release_host_memory(jax_caches=True)
    assert traced._cache_size() == 0
    assert float(compiled(jnp.ones(3))[0]) == 2.0  # ahead-of-time executables stay
    assert float(traced(jnp.ones(3))[0]) == 2.0  # recompiled on demand


def test_library_set_ups_keep_jax_caches_unless_the_program_opts_in(monkeypatch):
    """`train` and the benches end their set-up with `release_after_setup()`: it
    drops JAX's process-wide caches only after `configure_host()` (the `cn-jax`
    command's choice), never for a library caller."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(runtime, "_drop_jax_caches_after_setup", False)
    traced = jax.jit(lambda x: x * 3.0)
    traced(jnp.ones(3))
    runtime.release_after_setup()
    assert traced._cache_size() == 1
    runtime.configure_host()
    assert runtime._drop_jax_caches_after_setup
    runtime.release_after_setup()
    assert traced._cache_size() == 0


def test_the_command_opts_in_and_main_argv_does_not(monkeypatch):
    from cn_jax import cli

    monkeypatch.setattr(runtime, "_drop_jax_caches_after_setup", False)
    monkeypatch.setattr(runtime, "reexec_with_hugepages", lambda: None)
    assert cli.main(["info"]) == 0
    assert not runtime._drop_jax_caches_after_setup  # a call from Python
    monkeypatch.setattr(sys, "argv", ["cn-jax", "info"])
    assert cli.main() == 0
    assert runtime._drop_jax_caches_after_setup  # the command


@cpu_only
@pytest.mark.skipif(f"{FLAG}=true" in os.environ.get("XLA_FLAGS", ""), reason="user's choice")
def test_this_test_process_runs_memory_first():
    # conftest.py calls runtime.configure_host() before JAX starts, so every
    # other test here compiles with the memory-first scheduler.
    assert FLAG + "=false" in os.environ["XLA_FLAGS"]
    assert runtime.cpu_scheduler() == "memory-first"


# -- huge pages ---------------------------------------------------------------------

ON = f"{runtime.HUGEPAGE_TUNABLE}=1"


@pytest.mark.parametrize(
    "env, thp, glibc, plugins, expected",
    [
        ({}, "madvise", (2, 36), [], ON),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 35), [],
         f"glibc.malloc.arena_max=2:{ON}"),
        ({"GLIBC_TUNABLES": f"{runtime.HUGEPAGE_TUNABLE}=0"}, "madvise", (2, 36), [], None),
        ({"CN_JAX_HUGEPAGES": "0"}, "madvise", (2, 36), [], None),
        ({"CN_JAX_HUGEPAGES": "off"}, "madvise", (2, 36), [], None),
        ({"CN_JAX_HUGEPAGES": "1"}, "madvise", (2, 36), [], ON),
        ({}, "always", (2, 36), [], None),  # every large mapping has them already
        ({}, "never", (2, 36), [], None),  # none can
        ({}, None, (2, 36), [], None),  # no THP (or not Linux)
        ({}, "madvise", (2, 34), [], None),  # the tunable is glibc 2.35's
        ({}, "madvise", None, [], None),  # musl, macOS
        ({}, "madvise", (2, 36), ["xla_cuda13"], None),  # temporaries in device memory
    ],
)  # fmt: skip
def test_hugepage_env_only_where_it_changes_something(
    monkeypatch, env, thp, glibc, plugins, expected
):
    monkeypatch.setattr(runtime, "thp_mode", lambda: thp)
    monkeypatch.setattr(runtime, "glibc_version", lambda: glibc)
    monkeypatch.setattr(runtime, "accelerator_plugins", lambda: plugins)
    out = runtime.hugepage_env(env)
    if expected is None:
        assert out is None
    else:
        assert out == {**env, "GLIBC_TUNABLES": expected}
        assert runtime.hugepage_env(out) is None  # the restarted process goes on


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert runtime.thp_mode(f) == "madvise"
    f.write_text("[always] madvise never\n")
    assert runtime.thp_mode(f) == "always"
    assert runtime.thp_mode(tmp_path / "missing") is None


# malloc'd blocks this large are fresh mmaps: each 4 KiB page faults on first touch.
_FAULTS_CHILD = """
import ctypes, json, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
faults = []
for _ in range(3):  # the fewest of three: huge pages are the kernel's to give
    p = libc.malloc(n)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(p, 1, n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    libc.free(ctypes.c_void_p(p))
print(json.dumps(min(faults)))
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CN_JAX_HUGEPAGES")}


def test_hugepage_env_cuts_page_faults():
    env = runtime.hugepage_env(_clean_env())
    if env is None:
        pytest.skip("huge pages would change nothing on this machine")

    def faults(e):
        out = subprocess.run([sys.executable, "-c", _FAULTS_CHILD], env=e, capture_output=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    small, huge = faults(_clean_env()), faults(env)
    assert small >= (64 << 20) // 4096 * 0.9  # one fault per 4 KiB page
    assert huge < small / 4, (small, huge)  # 2 MiB pages: 32 of them, plus the unaligned ends


@pytest.mark.parametrize("opt_out", [False, True])
def test_cli_restarts_itself_with_huge_pages(opt_out):
    env = {**_clean_env(), "JAX_PLATFORMS": "cpu"}
    if opt_out:
        env["CN_JAX_HUGEPAGES"] = "0"
    expected = runtime.hugepage_env(env) is not None or runtime.thp_mode() == "always"
    out = subprocess.run(
        [sys.executable, "-m", "cn_jax.cli", "info"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("host memory:"))
    assert ("transparent huge pages" in line) == expected, line
    if runtime.hugepage_env({**_clean_env(), "JAX_PLATFORMS": "cpu"}) is not None:
        assert expected != opt_out  # on this machine the test tells the two apart


# -- the persistent compilation cache -------------------------------------------------


def test_compilation_cache_dir_follows_the_users_choice(tmp_path):
    home = {"XDG_CACHE_HOME": str(tmp_path)}
    assert runtime.compilation_cache_dir(home) == tmp_path / "cn_jax" / "jax_cache"
    assert runtime.compilation_cache_dir({**home, "CN_JAX_COMPILATION_CACHE": "/x/y"}) == (
        runtime.Path("/x/y")
    )
    assert runtime.compilation_cache_dir({**home, "CN_JAX_COMPILATION_CACHE": "0"}) is None
    assert runtime.compilation_cache_dir({**home, "JAX_COMPILATION_CACHE_DIR": "/j"}) is None


def test_configure_host_turns_the_persistent_cache_on(tmp_path):
    """Issue 22: `cn-jax train` / `sample` (every command: configure_host) keep compiled
    programs on disk, under the user's cache folder unless they chose another."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
    env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS="cpu")
    code = (
        "import jax, cn_jax; cn_jax.runtime.configure_host(); "
        "print(jax.config.jax_compilation_cache_dir)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "cn_jax" / "jax_cache")
