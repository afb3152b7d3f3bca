"""Benchmarks: the real train step and sampling loop, timed, with XLA's FLOP and memory counts.

- `bench_train`: one train step of a config, compiled ahead of time, on a
  synthetic batch: step time, samples/s, FLOPs, memory, fraction of peak.
- `bench_compare`: the ControlNet step vs plain fine-tuning of the same UNet,
  interleaved in one process (or compile-only), as ratios.
- `bench_sample`: sampler steps/s and images/s with CFG and one or two ControlNets.

`cn-jax bench train|compare|sample` runs them; docs/benchmarks.md says how each
published number was produced.
"""

from cn_jax.bench.measure import peak_tflops, program_flops, program_memory
from cn_jax.bench.sample import SampleBench, bench_sample
from cn_jax.bench.train import (
    TrainBench,
    batch_spec,
    bench_compare,
    bench_train,
    finetune_config,
    synthetic_batch,
)

__all__ = [
    "SampleBench",
    "TrainBench",
    "batch_spec",
    "bench_compare",
    "bench_sample",
    "bench_train",
    "finetune_config",
    "peak_tflops",
    "program_flops",
    "program_memory",
    "synthetic_batch",
]
