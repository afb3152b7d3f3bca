"""Process-level settings: XLA flags set before JAX starts, host memory handed back.

Nothing here runs on import: these are decisions for the program that owns the
process, not for a library. The `cn-jax` command and the bench scripts call
`configure_host()` first thing; a Python program may call it the same way,
before anything starts JAX:

    import cn_jax
    cn_jax.runtime.configure_host()

## XLA flags

One flag today, read by the CPU backend only: XLA's CPU scheduler orders
independent operations to run them concurrently by default, which keeps more
buffers alive at once. With that off (the memory-first, depth-first order) an
SD 1.5-shape ControlNet step needs less than half the temporaries at the same
step time (docs/benchmarks.md, "SD 1.5 shape, compile only"). GPU and TPU
compiles do not read it, and where an accelerator plugin is installed
(jax[cuda], libtpu) it is not set at all: a plugin carries its own copy of
XLA, which parses `XLA_FLAGS` too. Nor where this jaxlib's XLA does not define
it (`xla_knows`): XLA aborts on an unknown flag.

XLA reads `XLA_FLAGS` once, when JAX starts its backends; this flag given per
compile (`compiler_options=`) is accepted and ignored by the CPU client
(measured). So `configure_host()` appends it to `XLA_FLAGS`, and only if JAX
has not started yet; `cpu_scheduler()` says which scheduler runs. A flag the
user put in `XLA_FLAGS` stays as they set it:
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true` brings XLA's
default back.

## Host memory

`release_after_setup()` hands freed host memory back to the OS after set-up
and after compiling (`loop.train`, `TrainBench`, `SampleBench`): set-up and
compiling free many buffers in pieces glibc keeps for reuse, which would stay
in the resident set under the step. It also drops JAX's trace and compile
caches (the set-up's weight-init programs), but only in a process whose
program opted in with `configure_host()`: those caches are process-wide, and
a library call that emptied them would make every function its caller had
jitted trace and compile again (the test suite, which calls `train` many
times in one process, did exactly that).

## Huge pages

XLA's CPU client allocates a compiled program's temporaries (a train step's
gradients and activations, gigabytes at SD 1.5 shape) with `malloc` at every
call, and glibc serves blocks that large with a fresh `mmap` that it unmaps
again on `free`: every step the kernel faults in and zeroes that memory anew,
4 KiB a page. With glibc's `glibc.malloc.hugetlb=1` tunable malloc asks for
transparent huge pages (`madvise(MADV_HUGEPAGE)`), 2 MiB a fault: far fewer
faults and less kernel time a step (docs/benchmarks.md, "Host memory: huge
pages").

glibc reads its tunables once, when a process starts, so this cannot be
switched on from Python. `hugepage_env()` is the environment to run with,
and the `cn-jax` command re-executes itself once with it
(`reexec_with_hugepages`) where it changes something: Linux with glibc 2.35
or later, the kernel's transparent huge pages in `madvise` mode (with
`always` every large mapping gets them anyway; with `never` none can), no
accelerator plugin (the temporaries then live in device memory), and
neither `GLIBC_TUNABLES` naming the tunable already nor
`CN_JAX_HUGEPAGES=0` (the user's choice stands). Programs that import
cn_jax as a library run as they were started: export
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for the same effect.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import mmap
import os
import pkgutil
import re
import sys
from pathlib import Path

SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
DEFAULT_FLAGS: dict[str, str] = {SCHEDULER_FLAG: "false"}

# XLA_FLAGS as set_default_flags left it (None before it ran): what XLA reads at start.
_flags_seen: str | None = None


def _jax_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # jax not importable here: it cannot have started
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def accelerator_plugins() -> list[str]:
    """The JAX accelerator plugins installed (CUDA, ROCm, TPU...), by name."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # the namespace package plugins install into
    except ImportError:
        pass
    else:
        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))


@functools.cache
def xla_knows(flag: str) -> bool:
    """Whether the installed jaxlib's XLA defines `flag` (its name is in the library).

    XLA aborts the process on an unknown flag in `XLA_FLAGS`, so a flag is only
    ever set after this check: a jaxlib that renamed it runs without it.
    """
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = flag.encode()
    for folder in spec.submodule_search_locations:
        for lib in Path(folder).glob("*.so"):
            if lib.stat().st_size < 50 * 2**20:  # the stubs; XLA is the large one
                continue
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
    return False


def set_default_flags() -> bool:
    """Append `DEFAULT_FLAGS` the user has not named to `XLA_FLAGS`, if JAX has not
    started its backends yet, no accelerator plugin is installed (the flags are for
    the CPU backend, and a plugin's own XLA parses `XLA_FLAGS` too) and this
    jaxlib defines them. Returns whether `XLA_FLAGS` was changed."""
    global _flags_seen
    flags = _flags_seen = os.environ.get("XLA_FLAGS", "")
    if _jax_started() or accelerator_plugins():
        return False
    extra = [
        f"--{k}={v}" for k, v in DEFAULT_FLAGS.items() if f"--{k}" not in flags and xla_knows(k)
    ]
    if extra:
        os.environ["XLA_FLAGS"] = _flags_seen = " ".join([flags, *extra]).strip()
    return bool(extra)


def cpu_scheduler() -> str:
    """The XLA CPU scheduler in effect: "memory-first" or "concurrency" (XLA's default;
    also what runs where JAX had started before cn_jax could set its flag)."""
    flags = _flags_seen if _flags_seen is not None else os.environ.get("XLA_FLAGS", "")
    value = None
    for word in flags.split():
        if word.startswith(f"--{SCHEDULER_FLAG}"):
            value = word.partition("=")[2].lower() or "true"  # the last one wins, as in XLA
    return "memory-first" if value in ("false", "0") else "concurrency"


# Set by configure_host(): the program, not the library, decides process-wide policies.
_drop_jax_caches_after_setup = False


def configure_host(
    *, xla_flags: bool = True, drop_jax_caches: bool = True, compilation_cache: bool = True
) -> None:
    """Opt this process into cn_jax's process-wide host policies.

    Called first thing by the `cn-jax` command and the bench scripts; Python
    programs that own their process may call it too, before JAX starts.

    Args:
      xla_flags: append `DEFAULT_FLAGS` to `XLA_FLAGS` (`set_default_flags`:
        only before JAX starts, only flags the user did not set).
      drop_jax_caches: let `release_after_setup()` (the end of `train`'s,
        `TrainBench`'s and `SampleBench`'s set-up) drop JAX's trace and compile
        caches too (the set-up's weight-init programs). Without it a library
        call never empties caches its caller relies on.
      compilation_cache: keep compiled programs on disk (`compilation_cache_dir`),
        so a second `cn-jax train` or `sample` of the same shapes skips XLA's
        compile (minutes for an SD step on a GPU).
    """
    global _drop_jax_caches_after_setup
    if xla_flags:
        set_default_flags()
    if compilation_cache:
        folder = compilation_cache_dir()
        if folder is not None:
            import jax

            if not jax.config.jax_compilation_cache_dir:
                jax.config.update("jax_compilation_cache_dir", str(folder))
    _drop_jax_caches_after_setup = drop_jax_caches


def compilation_cache_dir(environ: dict[str, str] | None = None) -> Path | None:
    """Where `configure_host()` keeps compiled programs: `CN_JAX_COMPILATION_CACHE` (a
    folder, or 0 / off for none), else `$XDG_CACHE_HOME/cn_jax/jax_cache` (default
    `~/.cache/cn_jax/jax_cache`); None where the user chose otherwise (JAX's own
    `JAX_COMPILATION_CACHE_DIR` is set, and wins, or the variable says off)."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    choice = env.get("CN_JAX_COMPILATION_CACHE", "").strip()
    if choice.lower() in _OFF:
        return None
    if choice:
        return Path(choice).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cn_jax" / "jax_cache"


def release_after_setup() -> bool:
    """End of a set-up (weights built, the step compiled ahead of time): hand the
    freed host memory back, and drop JAX's caches where the program opted in with
    `configure_host()`. Returns what `release_host_memory` returns."""
    return release_host_memory(jax_caches=_drop_jax_caches_after_setup)


def release_host_memory(jax_caches: bool = False) -> bool:
    """Hand the host memory freed so far back to the OS (glibc `malloc_trim`).

    Set-up and compiling free many buffers (init copies, weights the step does
    not read, the compiler's own) in pieces glibc keeps for reuse, so they would
    stay in the process's resident set under the step (docs/benchmarks.md).

    `jax_caches=True` first drops JAX's trace and compile caches
    (`jax.clear_caches`): the traced and compiled weight-init programs of the
    set-up, which nothing calls again. Only where every function still needed is
    compiled ahead of time (a `Compiled` keeps its executable) or may be traced
    again: a jitted function called later recompiles.
    Returns False where there is no glibc (macOS, musl): only the caches are
    dropped there.
    """
    if jax_caches:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_OFF = ("0", "false", "no", "off")


def thp_mode(path: Path | str = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never");
    None where there is none to read (not Linux, or no THP support)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library's glibc; None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # no confstr, or not glibc
        return None


def hugepage_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment under which glibc's malloc uses transparent huge pages
    (`environ`, default `os.environ`, with `glibc.malloc.hugetlb=1` appended to
    `GLIBC_TUNABLES`), or None where starting with it would change nothing: see
    "Huge pages" in the module doc."""
    env = dict(os.environ if environ is None else environ)
    if env.get("CN_JAX_HUGEPAGES", "").strip().lower() in _OFF:
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if HUGEPAGE_TUNABLE in tunables:  # set by the user, or by the re-execution
        return None
    if not _tunable_asks_for_huge_pages() or accelerator_plugins():
        return None
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{HUGEPAGE_TUNABLE}=1") if t)
    return env


def host_hugepages(environ: dict[str, str] | None = None) -> bool:
    """Whether a process started with `environ` (default: this one's) gets transparent
    huge pages for its large host allocations: the kernel gives them to every large
    mapping (`always`), or it is in `madvise` mode and glibc is told to ask
    (`glibc.malloc.hugetlb` 1 or 2 in `GLIBC_TUNABLES`, glibc 2.35 or later)."""
    if thp_mode() == "always":
        return True
    env = os.environ if environ is None else environ
    tunables = dict(t.partition("=")[::2] for t in env.get("GLIBC_TUNABLES", "").split(":") if t)
    return tunables.get(HUGEPAGE_TUNABLE) in ("1", "2") and _tunable_asks_for_huge_pages()


def _tunable_asks_for_huge_pages() -> bool:
    """Whether `glibc.malloc.hugetlb` changes anything here: the kernel's THP mode is
    `madvise` and the C library is glibc 2.35 or later (where the tunable arrived)."""
    version = glibc_version()
    return thp_mode() == "madvise" and version is not None and version >= (2, 35)


def reexec_with_hugepages() -> None:
    """Replace this process by the same command under `hugepage_env()`, where that
    changes something and JAX has not started; otherwise return. For commands
    (the `cn-jax` CLI), never for a library call: the process starts over."""
    env = hugepage_env()
    if env is None or _jax_started():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv: the interpreter's own options and the way it was started
    # (a console script, -m, -c) come back as they were.
    os.execve(sys.executable, sys.orig_argv, env)
