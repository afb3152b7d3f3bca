"""Where the train step's time goes, by timing its parts as separate programs.

    python -m cn_jax.bench.profile --config configs/bench-small.yaml [k=v ...] [--ops] [--json OUT]

Compiles and times, on the same synthetic batch and state as `bench train`:
the frozen encoders alone (`encode_batch`: text encoder, VAE; nothing with
`data.cache_latents`), the forward pass (encoders + ControlNet + UNet + loss),
forward + backward (`value_and_grad` of the loss), the optimizer update alone
(clipping + AdamW on the trainable tree), and the real fused step. Backward =
(forward + backward) - forward. Separate programs lose the fusion across
their boundaries, so the parts need not add up to the step exactly; the step
is the real number, the parts say where it goes. For a per-operation view
(convolutions vs attention vs elementwise, forward vs backward) add `--ops`:
one more step runs under the profiler and `cn_jax.bench.ops` adds up the
trace's per-operation times by kind, layer and stage.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cn_jax.bench import measure
from cn_jax.bench.train import TrainBench
from cn_jax.config import Config
from cn_jax.kernels.choice import COUNTING
from cn_jax.train.step import draw_randomness, encode_batch, loss_fn


def profile_step(
    config: Config, repeats: int = 5, trace_dir: str | None = None, ops: bool = False
) -> dict[str, Any]:
    """Median seconds and XLA FLOPs of each part of one train step (one device).

    With `trace_dir`, three more steps run under `jax.profiler.trace` (a
    per-operation timeline for TensorBoard's profile plugin, xprof or Perfetto),
    and `ops` (the per-operation breakdown, `cn_jax.bench.ops`) is read from
    it; with `ops` alone one step is traced into a temporary directory.
    """
    b = TrainBench(config)
    models, ac = b.models, jnp.asarray(b.sd.schedule.alphas_cumprod(), jnp.float32)
    frozen, batch = b.frozen, b.batch
    draws = jax.jit(draw_randomness, static_argnums=(0, 3))(models, batch, b.rng, ac.shape[0])

    # Inputs are arguments, never closed over: a closed-over array would be
    # baked into the program as a constant, which is not the step's program.
    def parts(models):
        """(encode, loss, value_and_grad of the loss) computing with `models`."""

        def loss(p, frozen, batch, draws):
            return loss_fn(p, frozen, batch, draws, models, ac)[0]

        def encode(p, frozen, batch, draws):
            from cn_jax.train.state import merge

            return encode_batch(models, merge(p, frozen), batch, draws["vae_noise"])

        return {"encode": encode, "forward": loss, "forward_backward": jax.value_and_grad(loss)}

    run_fns, count_fns = parts(models), parts(models.with_kernels(COUNTING))
    tx = b.tx

    def update(p, g, opt_state):
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    run_fns["optimizer"] = count_fns["optimizer"] = update
    params = b.state.params
    out: dict[str, Any] = {"bench": "profile", **b.summary()}
    times: dict[str, float] = {"encode": 0.0}

    def part(name, *args):
        compiled = jax.jit(run_fns[name]).lower(*args).compile()
        result = compiled(*args)
        times[name] = measure.median(
            measure.timed(lambda: compiled(*args))[0] for _ in range(repeats)
        )
        # Counted as `TrainBench` counts the step: on the twin traced with the
        # counting kernels (no tile loops, no im2col padding).
        out[f"{name}_flops"] = measure.program_flops(jax.jit(count_fns[name]).lower(*args))
        return result

    inputs = (params, frozen, batch, draws)
    if not config.data.cache_latents:  # cached: the step encodes nothing
        part("encode", *inputs)
    part("forward", *inputs)
    _, grads = part("forward_backward", *inputs)
    part("optimizer", params, grads, b.state.opt_state)
    b.step()
    times["step"] = measure.median(b.step() for _ in range(repeats))
    times["backward"] = times["forward_backward"] - times["forward"]
    if trace_dir is not None or ops:
        from cn_jax.bench.ops import op_breakdown

        runs = 1 if trace_dir is None else 3
        breakdown = op_breakdown(b.compiled, b.step, runs=runs, trace_dir=trace_dir)
        if ops:
            out["ops"] = breakdown
        if trace_dir is not None:
            out["trace_dir"] = trace_dir
    out["seconds"] = times
    out["fractions_of_step"] = {
        k: times[k] / times["step"] for k in ("encode", "forward", "backward", "optimizer")
    }
    return out


def format_profile(r: dict) -> str:
    t, f = r["seconds"], r["fractions_of_step"]
    lines = [
        f"profile: {r['architecture']}, {r['trainable']}, {r['precision']}, batch "
        f"{r['batch_size']} @ {r['resolution']} px, cache_latents {r['cache_latents']}, "
        f"{r['device_kind']}",
        f"  step (fused)      {t['step']:.4g} s   {r['flops_per_step'] or 0:.3g} FLOP",
    ]
    for k in ("encode", "forward", "backward", "optimizer"):
        flops = r.get(f"{k}_flops")
        lines.append(
            f"  {k:<17} {t[k]:.4g} s   {f[k]:6.1%} of the step"
            + (f"   {flops:.3g} FLOP" if flops else "")
        )
    lines.append("  (forward includes encode; backward = forward_backward - forward)")
    if r.get("trace_dir"):
        lines.append(f"  trace of 3 steps: {r['trace_dir']}")
    if r.get("ops"):
        from cn_jax.bench.ops import format_breakdown

        lines.append(format_breakdown(r["ops"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cn_jax.bench.report import write_json
    from cn_jax.config import load_config

    p = argparse.ArgumentParser(description="time the parts of one train step")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--trace", default=None, help="also write a jax.profiler trace here")
    p.add_argument("--ops", action="store_true", help="per-operation breakdown of a step")
    args = p.parse_args(argv)
    config = load_config(args.config, args.overrides)
    r = profile_step(config, args.repeats, args.trace, args.ops)
    print(format_profile(r))
    if args.json:
        write_json(r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
