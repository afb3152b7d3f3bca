"""Benchmark harness (`cn-jax bench`, scripts/bench_*): every command runs on the tiny
config and reports what it documents. Tested for running, never for speed."""

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from cn_jax import runtime
from cn_jax.bench import measure
from cn_jax.bench.report import format_result, summary_table
from cn_jax.bench.train import devices_for, synthetic_batch
from cn_jax.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = str(ROOT / "configs" / "bench-small.yaml")


def _run(tmp_path, name, argv):
    out = tmp_path / f"{name}.json"
    assert main(["bench", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def compare(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    return _run(
        tmp, "compare", ["compare", "--config", SMALL, "train.batch_size=4", "--steps", "2"]
    )


@pytest.mark.slow  # compiles whole train steps or sampling loops
@pytest.mark.devices(8)
def test_train_step_on_all_devices_without_cache(tmp_path, capsys):
    # The token-id path (text encoder in the step), batch split over 8 devices.
    r = _run(tmp_path, "train", ["train", "--config", SMALL, "train.batch_size=8",
             "data.cache_latents=false", "--devices", "0", "--steps", "2"])  # fmt: skip
    assert r["bench"] == "train" and r["devices"] == 8 and r["platform"] == "cpu"
    assert r["xla_cpu_scheduler"] == "memory-first"  # cn_jax.runtime, set on import
    # main(argv) called in this process: no restart, so this process's pages.
    assert r["host_hugepages"] == runtime.host_hugepages()
    assert r["steps"] == 2 and len(r["step_times_s"]) == 2
    assert r["step_time_s"] == statistics.median(r["step_times_s"])
    assert r["compile_s"] > 0 and r["flops_per_step"] > 0 and r["step_time_s"] > 0
    assert math.isclose(r["samples_per_s"], 8 / r["step_time_s"])
    assert math.isclose(r["tflops_per_s"], r["flops_per_step"] / r["step_time_s"] / 1e12)
    assert r["peak_tflops"] is None and r["fraction_of_peak"] is None  # CPU: unknown
    m = r["memory"]
    assert m["peak_estimate_bytes"] == (
        m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
        + m["generated_code_bytes"]
    )  # fmt: skip
    assert m["alias_bytes"] > 0  # the state is donated
    assert math.isfinite(r["loss"]) and r["cache_latents"] is False
    assert r["params_trainable"] > 0 and r["params_frozen"] > r["params_trainable"]
    assert "samples / s" in capsys.readouterr().out
    # FLOPs per device: one device's share of the batch of 8 is one sample's step (the
    # count comes from the unpartitioned twin, divided over the devices).
    one = _run(tmp_path, "one", ["train", "--config", SMALL, "train.batch_size=1",
               "data.cache_latents=false", "--devices", "1", "--no-run"])  # fmt: skip
    assert math.isclose(r["flops_per_step"], one["flops_per_step"], rel_tol=0.05)


@pytest.mark.slow  # compiles whole train steps or sampling loops
def test_compare_reports_ratios_of_its_sides(compare, capsys):
    cn, ft = compare["controlnet"], compare["finetune"]
    assert cn["trainable"] == "controlnet" and ft["trainable"] == "unet"
    assert compare["interleaved"] is True
    for side in (cn, ft):
        assert len(side["step_times_s"]) == 2 and side["step_time_s"] > 0
        assert side["flops_per_step"] > 0 and side["memory"]["peak_estimate_bytes"] > 0
    assert compare["flops_ratio"] == cn["flops_per_step"] / ft["flops_per_step"]
    assert compare["time_ratio"] == cn["step_time_s"] / ft["step_time_s"]
    assert compare["memory_ratio"] == (
        cn["memory"]["peak_estimate_bytes"] / ft["memory"]["peak_estimate_bytes"]
    )
    # The ControlNet step trains fewer parameters and skips the UNet encoder's
    # weight gradients: fewer FLOPs than fine-tuning, even on the tiny model.
    assert 0.5 < compare["flops_ratio"] < 1.0
    assert compare["paper"] == {"memory_ratio": 1.23, "time_ratio": 1.34}
    assert "ratio" in format_result(compare)


@pytest.mark.slow  # compiles whole train steps or sampling loops
def test_compare_compile_only_matches_the_run(compare, tmp_path):
    r = _run(tmp_path, "cmp", ["compare", "--config", SMALL, "train.batch_size=4", "--no-run"])
    assert r["interleaved"] is False and r["time_ratio"] is None
    assert "step_time_s" not in r["controlnet"]
    # The same programs, compiled without any weight in memory.
    assert r["flops_ratio"] == compare["flops_ratio"]
    assert r["memory_ratio"] == compare["memory_ratio"]


def test_compare_needs_a_controlnet(capsys):
    argv = ["bench", "compare", "--config", SMALL, "train.trainable=unet", "--no-run"]
    assert main(argv) == 2
    assert "trainable" in capsys.readouterr().err


@pytest.mark.slow  # compiles whole train steps or sampling loops
def test_sample_two_controlnets(tmp_path):
    r = _run(tmp_path, "sample", ["sample", "--config", SMALL, "--steps", "2", "--batch", "2",
             "--controlnets", "2", "--repeats", "2"])  # fmt: skip
    assert r["bench"] == "sample" and r["controlnets"] == 2 and r["batch"] == 2
    assert len(r["loop_times_s"]) == 2 and r["loop_s"] > 0
    assert math.isclose(r["it_per_s"], 2 / r["loop_s"])
    assert math.isclose(r["images_per_s"], 2 / (r["text_s"] + r["loop_s"] + r["decode_s"]))
    assert r["compile_s"]["loop"] > 0 and r["compile_s"]["text"] > 0
    assert r["compile_s"]["decode"] is None and r["decode_s"] == 0  # tiny: no VAE
    assert r["memory"]["peak_estimate_bytes"] > 0
    # One summary line per result file.
    table = summary_table([r, r])
    assert len(table.splitlines()) == 4 and "it/s" in table  # device, header, 2 rows
    assert r["attention"] == "auto" and "(xla)" not in table
    assert "steps (xla)" in summary_table([{**r, "attention": "xla"}])  # a forced kernel shows


def test_synthetic_batch_ranges():
    import jax
    import numpy as np

    s = jax.ShapeDtypeStruct
    spec = {
        "pixel_values": s((2, 8, 8, 3), np.float32),
        "conditioning_pixel_values": s((2, 8, 8, 1), np.float32),
        "input_ids": s((2, 5), np.int32),
        "latent_logvar": s((2, 1, 1, 4), np.float32),
    }
    b = synthetic_batch(spec, vocab_size=7)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: (v.shape, v.dtype) for k, v in spec.items()
    }
    assert -1 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1
    assert 0 <= b["conditioning_pixel_values"].min() <= b["conditioning_pixel_values"].max() <= 1
    assert 0 <= b["input_ids"].min() and b["input_ids"].max() < 7
    spec = {k: s(v.shape, np.uint8) for k, v in spec.items() if "pixel" in k}
    b = synthetic_batch(spec, vocab_size=7)  # as the loader sends 8-bit data
    assert all(v.dtype == np.uint8 and v.max() > 200 for v in b.values())


def test_peak_table():
    assert measure.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert measure.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert measure.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert measure.peak_tflops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312.0
    assert measure.peak_tflops("NVIDIA H100 80GB HBM3", "float32") is None
    assert measure.peak_tflops("cpu", "bfloat16") is None
    with pytest.raises(ValueError, match="devices"):
        devices_for(10_000)


def _script(name="bench_vs_diffusers"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # compiles whole train steps or sampling loops
def test_bench_vs_diffusers_tiny(tmp_path, capsys):
    out = tmp_path / "vs.json"
    script = _script()
    argv = ["--config", SMALL, "--batch", "2", "--steps", "1", "--tasks", "controlnet",
            "--threads", "1", "--json", str(out)]  # fmt: skip
    assert script.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["batch"] == 2 and r["resolution"] == 32 and r["threads"] == 1
    # (ours sampling: test_sample_two_controlnets; theirs: a test below)
    assert "sample" not in r and "finetune" not in r
    t = r["controlnet"]
    assert t["ours_s"] > 0 and t["theirs_s"] > 0
    assert t["time_ratio"] == t["ours_s"] / t["theirs_s"]
    assert t["ours_peak_rss_bytes"] is None  # one process: not split per side
    assert t["ours_info"]["flops_per_step"] > 0
    # PyTorch's step split into its parts: one timed step, so they add up to it
    parts = t["theirs_parts_s"]
    assert list(parts) == ["forward", "backward", "clip", "optimizer"]
    assert min(parts.values()) > 0 and sum(parts.values()) == pytest.approx(t["theirs_s"])
    out = capsys.readouterr().out
    assert "ours/theirs" in out and "PyTorch controlnet step, median s per part" in out


def test_bench_attention_tiny(tmp_path, capsys):
    """scripts/bench_attention.py runs (never timed): all three kernels on one small
    shape, the tiled kernel's error against JAX's path reported and small, a bad
    --shape refused. (The tiling itself: tests/test_attention.py.)"""
    out = tmp_path / "attn.json"
    script = _script("bench_attention")
    assert script.main(["--shape", "2,16,7,2,8", "--repeats", "1", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["shape"] == [2, 16, 7, 2, 8] and r["tiled_max_rel_err"] < 1e-5
    for name in ("xla", "tiled", "torch"):
        assert r[f"{name}_fwd_ms"] > 0 and r[f"{name}_fwd+bwd_ms"] > 0
    assert r["tiled_temp_bytes"] > 0
    assert "xla / tiled" in capsys.readouterr().out
    assert script.main(["--shape", "2,16,7"]) == 2


def test_bench_conv_tiny(tmp_path, capsys):
    """scripts/bench_conv.py runs (never timed): all three kernels and three parts on
    one small shape, im2col's error against XLA's convolution small, auto's pick
    reported, a bad --shape refused. (Correctness itself: tests/test_convolution.py.)"""
    out = tmp_path / "conv.json"
    script = _script("bench_conv")
    assert script.main(["--shape", "2,6,4,5,3,2", "--repeats", "1", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["shape"] == [2, 6, 4, 5, 3, 2] and r["im2col_max_rel_err"] < 1e-5
    assert r["auto"] in ("xla", "im2col")
    for name in ("xla", "im2col", "torch"):
        for part in ("fwd", "dx", "dw"):
            assert r[f"{name}_{part}_ms"] > 0
    assert "im2col / xla" in capsys.readouterr().out
    assert script.main(["--shape", "2,6,4"]) == 2


def test_bench_vs_diffusers_ratios():
    script = _script()
    args = script.parse_args(["--tasks", "controlnet,finetune", "--isolate"])
    times = {"controlnet": {"ours": [1.0, 3.0], "theirs": [4.0]},
             "finetune": {"ours": [4.0], "theirs": [5.0]}}  # fmt: skip
    peaks = {("controlnet", "ours"): 3, ("controlnet", "theirs"): 4, ("finetune", "ours"): 6,
             ("finetune", "theirs"): 5}  # fmt: skip
    rss = {(*k, "peak_rss_bytes"): v for k, v in peaks.items()}
    spec = {"batch": 1, "resolution": 8, "precision": "float32"}
    parts = [{"forward": f, "backward": 2.0, "clip": 0.5, "optimizer": 1.0} for f in (1, 2, 6)]
    info = {("finetune", "theirs"): {"parts_s": parts}}
    r = script.summarize(args, spec, {"times": times, "info": info, "rss": rss})
    assert r["finetune"]["theirs_parts_s"]["forward"] == 2  # median per part
    assert "theirs_parts_s" not in r["controlnet"]  # none recorded
    assert r["controlnet"]["ours_s"] == 2.0 and r["controlnet"]["time_ratio"] == 0.5
    assert r["controlnet"]["rss_ratio"] == 0.75 and r["controlnet"]["steps_rss_ratio"] is None
    c = r["controlnet_vs_finetune"]
    assert c["ours"] == {"time_ratio": 0.5, "rss_ratio": 0.5, "steps_rss_ratio": None}
    assert c["theirs"]["time_ratio"] == 0.8 and c["theirs"]["rss_ratio"] == 0.8
    assert "ControlNet / fine-tune" in script.format_summary(r)


def test_bench_vs_diffusers_hugepages_per_side(monkeypatch):
    # --hugepages: which side's subprocess gets cn_jax.runtime.hugepage_env().
    script = _script()
    from cn_jax import runtime

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(runtime, "hugepage_env", lambda: {"GLIBC_TUNABLES": "on"})
    for choice, ours, theirs in [("ours", True, False), ("both", True, True),
                                 ("none", False, False)]:  # fmt: skip
        args = script.parse_args(["--isolate", "--hugepages", choice])
        envs = {side: script.side_env(args, side) for side in ("ours", "theirs")}
        assert [e.get("GLIBC_TUNABLES") == "on" for e in envs.values()] == [ours, theirs]
    assert script.parse_args([]).hugepages == "ours"


@pytest.mark.slow  # about 15 s of compiling sub-programs; -m "not slow" skips it
def test_profile_parts(capsys):
    from cn_jax.bench.profile import main as profile_main

    argv = ["--config", SMALL, "train.batch_size=4", "--repeats", "1", "--ops"]
    assert profile_main(argv) == 0
    out = capsys.readouterr().out
    for part in ("step (fused)", "forward", "backward", "optimizer", "per operation"):
        assert part in out
    assert "convolution layers" in out and "self-attention" in out


def test_bench_vs_diffusers_child_reports_rss(tmp_path, capsys):
    # One side alone, as --isolate runs it in a subprocess (here: in this process).
    script = _script()
    from cn_jax.config import load_config

    config = load_config(SMALL, ["train.batch_size=2"])
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(script.torch_spec(config)))
    argv = ["--config", SMALL, "--batch", "2", "--sample-steps", "2", "--repeats", "2",
            "--only", "theirs:sample", "--spec", str(spec_file), "--threads", "1"]  # fmt: skip
    assert script.main(argv) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][0]
    r = json.loads(line[len("RESULT ") :])
    assert len(r["times"]) == 2 and min(r["times"]) > 0  # --repeats sampling loops
    assert r["peak_rss_bytes"] >= r["steps_peak_rss_bytes"] > 0


def test_bench_gpu_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "bench_gpu.sh")], check=True)
    out = subprocess.run(
        [sys.executable, "-m", "cn_jax.cli", "bench", "sample", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    for flag in ("--steps", "--batch", "--controlnets", "--json"):
        assert flag in out.stdout


HLO = """HloModule m

%fused_conv (p0: f32[1,8,8,4], p1: f32[3,3,4,4]) -> f32[1,8,8,4] {
  %p0 = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,4,4]{3,2,1,0} parameter(1)
  ROOT %c = f32[1,8,8,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}
}

%fused_t (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  ROOT %t = f32[4,4]{0,1} transpose(%p0), dimensions={1,0}
}

%body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %p = (s32[], f32[4,4]) parameter(0)
  ROOT %inner_dot = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}
}

ENTRY %main (a: f32[1,8,8,4], w: f32[3,3,4,4], m: f32[4,4]) -> f32[4,4] {
  %a = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %ynn_fusion.1 = f32[1,8,8,4] fusion(%a, %w), kind=kCustom, calls=%fused_conv, metadata={op_name="transpose(jvp(U))/up_0/conv1/conv"}
  %copy_fusion.2 = f32[4,4]{0,1} fusion(%m), kind=kLoop, calls=%fused_t, metadata={op_name="jvp(C)/cond_embedding/conv_in"}
  %while.3 = (s32[], f32[4,4]) while(%t), condition=%cond, body=%body, metadata={op_name="jvp(U)/down_0/attn1/while"}
  ROOT %add.4 = f32[4,4]{1,0} add(%m, %m), metadata={op_name="jit(step)/mul"}
}
"""  # noqa: E501 (XLA's own line format)


def test_ops_breakdown_classifies_by_kind_layer_and_stage():
    from cn_jax.bench import ops

    durations = {"ynn_fusion.1": 0.4, "copy_fusion.2": 0.1, "while.3": 0.3, "add.4": 0.2,
                 "inner_dot": 5.0, "ThunkExecutor::Execute": 9.0}  # fmt: skip
    r = ops.breakdown(HLO, durations, wall_s=1.25, runs=1)
    # Loop bodies and runtime events are not counted (the loop's own event covers them).
    assert r["ops_seconds"] == pytest.approx(1.0) and r["coverage"] == pytest.approx(0.8)
    assert r["by_kind"] == pytest.approx({"convolution": 0.4, "loop / call": 0.3,
                                          "other (elementwise, reduce)": 0.2,
                                          "copy / transpose": 0.1})  # fmt: skip
    assert r["by_layer"] == pytest.approx({"convolution layers": 0.4, "self-attention": 0.3,
                                           "other": 0.2, "condition encoder": 0.1})  # fmt: skip
    assert r["by_stage"] == pytest.approx({"backward": 0.4, "forward": 0.4,
                                           "other (loss, noise, optimizer)": 0.2})  # fmt: skip
    assert [t["name"] for t in r["top"]] == ["ynn_fusion.1", "while.3", "add.4", "copy_fusion.2"]
    assert "self-attention" in ops.format_breakdown(r)
    assert ops.layer_of("") == "no metadata (XLA-made)"


def test_ops_breakdown_of_a_real_trace(tmp_path):
    """On this backend's real trace: a convolution and a matmul are found and timed."""
    import jax
    import jax.numpy as jnp

    from cn_jax.bench import ops

    def f(x, w, m):
        nhwc = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=nhwc)
        return jnp.tanh(y).reshape(-1, 64) @ m

    args = (jnp.ones((4, 32, 32, 16)), jnp.ones((3, 3, 16, 16)), jnp.ones((64, 64)))
    compiled = jax.jit(f).lower(*args).compile()
    r = ops.op_breakdown(compiled, lambda: jax.block_until_ready(compiled(*args)), runs=2,
                         trace_dir=str(tmp_path))  # fmt: skip
    assert r["ops_seconds"] > 0 and 0 < r["coverage"]
    assert {"convolution", "matmul"} <= set(r["by_kind"]), r["by_kind"]


@pytest.mark.slow  # compiles whole train steps or sampling loops
def test_flops_count_the_tiled_kernels_loops_in_full(monkeypatch):
    """XLA counts a loop body once. With tiles small enough that the tiled attention
    kernel loops, the bench counts FLOPs on the loop-free twin (JAX's attention), so
    the figure does not drop with the tile size; the compiled step itself does loop."""
    from cn_jax.bench.train import TrainBench
    from cn_jax.config import load_config
    from cn_jax.kernels import tiled_attention as attn

    def bench(impl, conv="xla"):
        overrides = [f"model.attention={impl}", f"model.convolution={conv}"]
        return TrainBench(load_config(SMALL, overrides), run=False)

    xla = bench("xla")
    assert xla.flops_source == "step" and not measure.attention_loops(xla.compiled)
    # im2col multiplies the padding zeros as well: its own count is higher, the
    # twin's is the convolutions' (lowered, not compiled: XLA's optimiser moves the
    # count by under 1%).
    im2col = bench("xla", "im2col")
    assert im2col.flops_source == "step with xla attention and convolutions (lowered)"
    assert im2col.flops == pytest.approx(xla.flops, rel=0.02), (im2col.flops, xla.flops)
    im2col_own = measure.program_flops(im2col.compiled)
    assert im2col_own > 1.05 * im2col.flops, (im2col_own, im2col.flops)
    monkeypatch.setattr(attn, "FORWARD_TILE", 64)
    monkeypatch.setattr(attn, "BACKWARD_TILE", 64)
    tiled = bench("tiled")
    assert measure.attention_loops(tiled.compiled)
    assert tiled.flops_source == "step with xla attention and convolutions (lowered)"
    assert tiled.summary()["flops_counted_on"] == tiled.flops_source
    assert tiled.flops == pytest.approx(xla.flops, rel=0.02), (tiled.flops, xla.flops)
    # What the compiled step's own count would have said: far fewer (one tile a loop).
    assert measure.program_flops(tiled.compiled) < 0.9 * xla.flops


def test_bench_sample_times_the_pipelines_own_loop(monkeypatch):
    """`cn-jax bench sample` compiles `ControlNetPipeline`'s own steps on a job made
    by its `prepare`: its loop program traces the pipeline's one loop
    (`guidance.denoise`), and the timed loop's latents are, bit for bit, what the
    pipeline's generation program returns for that job."""
    import numpy as np

    from cn_jax import pipeline
    from cn_jax.bench.sample import SampleBench
    from cn_jax.config import load_config

    traced = []
    loop = pipeline.denoise
    monkeypatch.setattr(pipeline, "denoise", lambda *a, **k: traced.append(1) or loop(*a, **k))
    b = SampleBench(load_config(SMALL), batch=2, steps=2)
    assert len(traced) == 1 and b.pipe.trace_count == 0  # the bench's loop program
    b.run_loop()
    images = b.pipe.run(b.job)  # the program a pipeline call runs on this job
    assert len(traced) == 2 and b.pipe.trace_count == 1
    expected = np.clip(np.asarray(b.final, np.float32) / 2 + 0.5, 0.0, 1.0)  # tiny: no VAE
    np.testing.assert_array_equal(images, expected)


# -- issue 22: lowering for other platforms, FLOP twins, flags in every result -----------

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.mark.slow  # lowers 6 programs twice (export, FLOPs): about 25 s of CPU
def test_bench_lower_tiny_for_cuda_and_tpu(tmp_path, monkeypatch, capsys):
    """`cn-jax bench lower` on the tiny config in bfloat16 (where a GPU run takes cuDNN
    attention): with `jax.export`, no device and no weights, every program lowers for
    both platforms; without a GPU here cuDNN is reported and replaced by XLA; the TPU
    train step and sampling loop hold the Pallas kernel; versions and flags are
    recorded."""
    import jax

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5")
    r = _run(tmp_path, "lower", ["lower", "--config", TINY, "train.precision=bfloat16",
             "--platforms", "cuda,tpu"])  # fmt: skip
    assert r["bench"] == "lower" and r["ok"] and r["precision"] == "bfloat16"
    rows = {(x["platform"], x["program"]): x for x in r["programs"]}
    programs = ("train_step", "sample_text", "sample_loop")  # tiny: no VAE, no decode
    assert set(rows) == {(p, n) for p in ("cuda", "tpu") for n in programs}
    for row in rows.values():
        assert row["ok"] and row["seconds"] > 0 and row["stablehlo_bytes"] > 10_000
        assert row["flops"] > 0
    cuda, tpu = r["platforms"]["cuda"], r["platforms"]["tpu"]
    if jax.default_backend() != "gpu":
        assert cuda["kernels"]["attention"] == "xla"
        assert cuda["notes"] == [
            "cudnn: cannot lower without a GPU (cuDNN is not detected.); lowered with xla"
        ]
    assert tpu["kernels"] == {"attention": "auto", "convolution": "xla"} and not tpu["notes"]
    for name in ("train_step", "sample_loop"):
        assert rows["tpu", name]["custom_calls"].get("tpu_custom_call", 0) > 0, name
        assert "tpu_custom_call" not in rows["cuda", name]["custom_calls"]
    assert r["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".5" and r["jax"] == jax.__version__
    out = capsys.readouterr().out
    assert "6 of 6 programs lowered" in out and "tpu_custom_call" in out


def test_bench_lower_names_the_platforms_it_knows(capsys):
    argv = ["bench", "lower", "--config", TINY, "--platforms", "gpu,tpu"]
    assert main(argv) == 2
    assert "cuda, rocm, tpu, cpu" in capsys.readouterr().err


def test_flops_are_counted_on_the_xla_twin_unless_the_kernels_are_xlas():
    """A cuDNN or Pallas attention is a custom call XLA may count as zero FLOPs, the
    tiled kernel's loops are counted once, im2col multiplies zeros: any kernel choice
    but XLA's own (and "auto", which may pick one) is counted on the XLA twin."""
    from cn_jax.kernels import Kernels

    assert not measure.counts_on_twin(Kernels("xla", "xla", "gpu"))
    assert not measure.counts_on_twin(Kernels("xla", "xla").for_platform("cpu"))
    for k in (
        Kernels().for_platform("gpu"), Kernels().for_platform("tpu"),
        Kernels().for_platform("cpu"), Kernels("cudnn", "xla", "gpu"),
        Kernels("pallas", "xla", "tpu"), Kernels("tiled", "xla"), Kernels("xla", "im2col"),
        Kernels("xla", "auto", "cpu"),
    ):  # fmt: skip
        assert measure.counts_on_twin(k), k


def test_every_bench_result_records_versions_and_flags(monkeypatch):
    """`device_info`, part of every train, compare, sample and profile summary, holds
    the JAX and jaxlib versions and the XLA / allocator environment as set."""
    import os

    import jax
    import jaxlib

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    info = measure.device_info(jax.devices())
    assert info["jax"] == jax.__version__ and info["jaxlib"] == jaxlib.__version__
    env = info["env"]
    assert env["XLA_FLAGS"] == os.environ.get("XLA_FLAGS")
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".9"
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] is None
    assert json.loads(json.dumps(info)) == info  # goes into the JSON as it is


def test_bench_data_reports_the_pipeline_beside_a_bare_decode(tmp_path, capsys):
    """`cn-jax bench data` on a tiny generated set: the loader at each worker count, the
    bare decode loop over the same files, efficiency per worker and cores per GPU."""
    r = _run(tmp_path, "data", [
        "data", "--config", str(ROOT / "configs" / "demo.yaml"), "--workers", "1,2",
        "--samples", "8", "--size", "32", "--batch", "4", "--data", str(tmp_path / "set"),
    ])  # fmt: skip
    assert r["bench"] == "data" and r["resolution"] == 32 and r["samples"] == 8
    assert [row["workers"] for row in r["loader"]] == [1, 2]
    for row in r["loader"]:
        assert row["samples_per_s"] > 0
        want = row["samples_per_s"] / (row["workers"] * r["bare_samples_per_s"])
        assert math.isclose(row["efficiency_per_worker"], want)
    assert r["bare_samples_per_s"] > 0 and r["cores_per_gpu"] >= 1
    assert {"date", "machine", "tokenizer", "cores_per_gpu_bare"} <= set(r)
    assert "bench data: 32 px" in capsys.readouterr().out
    assert (tmp_path / "set" / "bench_meta.txt").is_file()  # reused by a second run
