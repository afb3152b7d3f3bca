"""Print the float32 parity of cn_jax against diffusers (PyTorch, CPU) for the
test configurations (SD 1.x/2.x shapes and SDXL's, with its added conditioning):
random weights in every parameter, zero convs included. Usage: .venv/bin/python scripts/parity.py"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax  # noqa: E402
import torch  # noqa: E402

from reference import (  # noqa: E402
    CONFIGS,
    SDXL_CONFIGS,
    added_inputs,
    flax_controlnet_params,
    flax_unet_params,
    inputs,
    max_rel_err,
    nchw,
    nhwc,
    torch_added,
    torch_controlnet,
    torch_unet,
)

jax.config.update("jax_default_matmul_precision", "highest")


def main() -> None:
    print(f"{'config':8} {'UNet':>10} {'ControlNet':>11} {'UNet+CN':>10}  (max relative error)")
    for name in [*sorted(CONFIGS), *sorted(SDXL_CONFIGS)]:
        tu, tc = torch_unet(name), torch_controlnet(name)
        (unet, up), (cnet, cp) = flax_unet_params(tu), flax_controlnet_params(tc)
        x, t, ctx, cond = inputs(name)
        tx, tt, tctx, tcond = nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond)
        added = added_inputs() if name in SDXL_CONFIGS else None
        kw = {} if added is None else {"added_cond_kwargs": added}
        tkw = {} if added is None else {"added_cond_kwargs": torch_added(added)}
        with torch.no_grad():
            ref_eps = nhwc(tu(tx, tt, tctx, **tkw).sample)
            rd, rm = tc(tx, tt, tctx, tcond, return_dict=False, **tkw)
            ref_ctl = nhwc(
                tu(
                    tx, tt, tctx, down_block_additional_residuals=rd,
                    mid_block_additional_residual=rm, **tkw,
                ).sample
            )  # fmt: skip
        down, mid = cnet.apply({"params": cp}, x, t, ctx, cond, **kw)
        e_unet = max_rel_err(unet.apply({"params": up}, x, t, ctx, **kw), ref_eps)
        e_cn = max(max_rel_err(a, nhwc(b)) for a, b in zip([*down, mid], [*rd, rm]))
        eps = unet.apply(
            {"params": up}, x, t, ctx,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, **kw,
        )  # fmt: skip
        e_all = max_rel_err(eps, ref_ctl)
        print(f"{name:8} {e_unet:10.2e} {e_cn:11.2e} {e_all:10.2e}")


if __name__ == "__main__":
    main()
