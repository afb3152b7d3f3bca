"""The pure train step: what trains, what stays frozen, accumulation, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn_jax.config import load_config
from cn_jax.train import sharding as shd
from cn_jax.train.loop import build, compute_dtype
from cn_jax.train.state import (
    TrainState,
    group_labels,
    labels_for,
    make_optimizer,
    merge,
    split,
)
from cn_jax.train.step import image_to_model_range, make_train_step

# What `build` reads of `train`: the other fields (optimizer, EMA) share one build.
_BUILD_FIELDS = {"trainable", "seed", "precision", "remat"}


@functools.cache
def _built(trainable, build_items=()):
    return build(load_config(None, [f"train.trainable={trainable}",
                                    *(f"train.{k}={v}" for k, v in build_items)]))  # fmt: skip


@functools.cache
def _setup(trainable="controlnet", **train):
    overrides = [f"train.trainable={trainable}", "train.learning_rate=1e-3"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    config = load_config(None, overrides)
    models, params, sd = _built(
        trainable, tuple(sorted((k, v) for k, v in train.items() if k in _BUILD_FIELDS))
    )
    return config, models, params, sd


def _batch(sd, n=8, seed=0):
    rng = np.random.default_rng(seed)
    from cn_jax.tokenizer import tokenize

    prompts = ["red circle with navy blue background", ""] * (n // 2)
    return {
        # uint8, as the loader sends 8-bit data: the step maps them to [-1, 1] and [0, 1].
        "pixel_values": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "conditioning_pixel_values": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "input_ids": tokenize(sd.tokenizer, prompts, 16),
    }


@functools.cache
def _compiled(trainable, grad_accum, devices, fsdp, train_items):
    """Initial state, frozen tree and the jitted step (cached: compiles once per setup)."""
    train = dict(train_items)
    config, models, params, sd = _setup(trainable, **train)
    labels = labels_for(params, trainable)
    tr, frozen = split(params, labels, frozen_dtype=compute_dtype(config))  # as loop.train
    tx = make_optimizer(config.train, group_labels(tr, labels))
    state = TrainState.create(tr, tx, ema=config.train.ema_decay is not None)
    step = make_train_step(
        models, sd.schedule.alphas_cumprod(), tx, grad_accum, config.train.ema_decay
    )
    if devices is None:
        return jax.jit(step), state, frozen, params, labels, None
    mesh = shd.make_mesh(fsdp, jax.devices()[:devices])
    state_sh, frozen_sh = shd.param_shardings(mesh, state), shd.param_shardings(mesh, frozen)
    state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
    fn = jax.jit(
        step,
        in_shardings=(state_sh, frozen_sh, shd.batch_sharding(mesh), shd.replicated(mesh)),
        out_shardings=(state_sh, shd.replicated(mesh)),
    )
    return fn, state, frozen, params, labels, mesh


def _run(trainable="controlnet", steps=2, grad_accum=1, batch=None, devices=None, fsdp=1, **train):
    fn, state, frozen, params, labels, mesh = _compiled(
        trainable, grad_accum, devices, fsdp, tuple(sorted(train.items()))
    )
    batch = _batch(_setup(trainable, **train)[3]) if batch is None else batch
    if mesh is not None:
        batch = shd.global_batch(batch, mesh)
    rng = jax.random.PRNGKey(0)
    losses = []
    for _ in range(steps):
        state, metrics = fn(state, frozen, batch, rng)
        losses.append(float(metrics["loss"]))
    return state, frozen, params, labels, losses


def _leaves(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_frozen_untouched_zero_convs_learn_no_optimizer_state_for_frozen():
    state, frozen, params, labels, losses = _run()
    assert all(np.isfinite(losses))
    before = _leaves(params)
    for k, v in _leaves(frozen).items():  # frozen params bitwise unchanged
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    after = _leaves(state.params)
    assert set(after) == {k for k, lab in labels.items() if lab != "frozen"}
    assert all(k.startswith("controlnet/") for k in after)
    zero_convs = [k for k in after if "controlnet_down_blocks" in k or "controlnet_mid" in k]
    assert zero_convs and all(np.any(after[k]) for k in zero_convs)  # moved off zero
    # Optimizer moments exist for exactly the trainable leaves.
    mu_paths = set()
    for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "mu" in keys:
            mu_paths.add("/".join(keys[keys.index("mu") + 1 :]))
    assert {p.split("controlnet/", 1)[-1] for p in mu_paths} == {
        k.split("controlnet/", 1)[-1] for k in after
    }
    n_frozen = sum(v.size for v in _leaves(frozen).values())
    n_opt = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.opt_state))
    assert n_opt < 2 * sum(v.size for v in after.values()) + 100 < n_frozen + n_opt


def test_every_leaf_needs_a_rule():
    _, _, params, _ = _setup()
    bad = {**params, "mystery": {"w": jnp.zeros(2)}}
    with pytest.raises(ValueError, match="no rule covers.*mystery"):
        labels_for(bad, "controlnet")


@pytest.mark.slow  # a train step compile each; the fast tier keeps the frozen/trainable split
def test_controlnet_plus_decoder_trains_only_the_decoder_half():
    state, frozen, params, labels, _ = _run("controlnet+decoder", decoder_learning_rate=1e-4)
    trained = _leaves(state.params)
    assert any(k.startswith("unet/up_blocks_") for k in trained)
    assert not any(k.startswith(("unet/down_blocks", "unet/mid_block")) for k in trained)
    assert any(k.startswith("unet/down_blocks") for k in _leaves(frozen))
    before = _leaves(params)
    assert any(
        not np.array_equal(v, before[k]) for k, v in trained.items() if k.startswith("unet/")
    )


@pytest.mark.slow  # a train step compile each; the fast tier keeps the frozen/trainable split
def test_plain_unet_finetuning_has_no_controlnet():
    state, _, _, _, losses = _run("unet")
    assert all(k.startswith("unet/") for k in _leaves(state.params)) and np.isfinite(losses).all()


# Adam divides each gradient element by its own magnitude, so float32
# summation-order noise in a near-zero element becomes a visible fraction of lr.
# To compare gradients (what accumulation and sharding must preserve) through
# the real optimizer, these runs use adam_eps=1: the update is then ~lr * grad.
LINEAR = {"adam_eps": 1.0, "learning_rate": 1.0}


def _assert_same_updates(a, b, params, rtol):
    before = _leaves(params)
    for k, v in _leaves(a.params).items():
        da, db = v - before[k], _leaves(b.params)[k] - before[k]
        scale = max(np.abs(da).max(), 1e-12)
        assert np.abs(da - db).max() <= rtol * scale, (k, np.abs(da - db).max() / scale)


@pytest.mark.slow  # a train step compile each; the fast tier keeps the frozen/trainable split
def test_grad_accumulation_equals_one_big_batch():
    a = _run(grad_accum=1, steps=1, **LINEAR)
    b = _run(grad_accum=2, steps=1, **LINEAR)  # same compiled step serves `c` below
    assert abs(a[4][0] - b[4][0]) <= 1e-6 * abs(a[4][0])
    _assert_same_updates(a[0], b[0], a[2], rtol=1e-4)
    # And it is not vacuous: a different batch gives a different update.
    c = _run(grad_accum=2, steps=1, batch=_batch(_setup(**LINEAR)[3], seed=1), **LINEAR)
    with pytest.raises(AssertionError):
        _assert_same_updates(a[0], c[0], a[2], rtol=1e-4)


@pytest.mark.slow  # a train step compile each; the fast tier keeps the frozen/trainable split
@pytest.mark.devices(8)
def test_one_device_equals_eight_devices():
    assert len(jax.devices()) >= 8, "marked devices(8): tests/conftest.py"
    one = _run(devices=1, **LINEAR)
    eight = _run(devices=8, fsdp=2, **LINEAR)  # 4 data x 2 fsdp
    np.testing.assert_allclose(one[4], eight[4], rtol=1e-5)
    _assert_same_updates(one[0], eight[0], one[2], rtol=1e-4)


@pytest.mark.slow  # a train step compile each; the fast tier keeps the frozen/trainable split
def test_ema_tracks_params_with_warmup():
    from cn_jax.train.step import ema_decay_at

    # diffusers' EMAModel: 0, then min(decay, (1 + s) / (10 + s)) with s = step - 1.
    assert [float(ema_decay_at(n, 0.999)) for n in (1, 2, 3)] == pytest.approx(
        [0.0, 2 / 11, 3 / 12]
    )
    assert float(ema_decay_at(100_000, 0.999)) == pytest.approx(0.999)
    one = _run(ema_decay=0.5, steps=1)[0]
    two = _run(ema_decay=0.5, steps=2)[0]
    p1, e1 = _leaves(one.params), _leaves(one.ema_params)
    p2, e2 = _leaves(two.params), _leaves(two.ema_params)
    k = next(k for k in p1 if "controlnet_mid_block" in k and k.endswith("kernel"))
    np.testing.assert_array_equal(e1[k], p1[k])  # step 1: the EMA is the trained weights
    d = 2 / 11  # min(0.5, 2 / 11)
    np.testing.assert_allclose(e2[k], d * p1[k] + (1 - d) * p2[k], rtol=1e-5, atol=1e-9)
    assert not np.array_equal(e2[k], p2[k])


def test_random_bases_of_one_architecture_share_one_init_program():
    """`random_pipeline` jits each architecture's init once per process (every
    `train` of a random base builds one): same program, the seed's own values."""
    from cn_jax.weights import sd as sdmod

    a, b = sdmod.random_pipeline("tiny", seed=0), sdmod.random_pipeline("tiny", seed=1)
    assert sdmod._jitted_init(a.unet) is sdmod._jitted_init(b.unet)
    assert sdmod._jitted_init(a.unet)._cache_size() == 1  # traced and compiled once
    la, lb = jax.tree_util.tree_leaves(a.unet_params), jax.tree_util.tree_leaves(b.unet_params)
    assert any(not np.array_equal(x, y) for x, y in zip(la, lb))
    c = sdmod.random_pipeline("tiny", seed=0)
    for x, y in zip(la, jax.tree_util.tree_leaves(c.unet_params)):
        np.testing.assert_array_equal(x, y)


def test_merge_inverts_split():
    _, _, params, _ = _setup()
    tr, fr = split(params, labels_for(params, "controlnet"))
    assert _leaves(merge(tr, fr)).keys() == _leaves(params).keys()


def test_bfloat16_training_stores_frozen_weights_in_bfloat16():
    """Issue 22: with `train.precision: bfloat16` the frozen weights (UNet, VAE, text
    encoder) are stored in bfloat16, half their float32 memory and no cast a step; the
    trained copy, and so the optimizer state, stays float32. Integer leaves and
    shape-only trees (the benches' `eval_shape`) follow the same rule."""
    _, _, params, _ = _setup()
    labels = labels_for(params, "controlnet")
    tr, fr = split(params, labels, frozen_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(fr)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(tr)} == {jnp.dtype(jnp.float32)}
    f32 = split(params, labels)[1]
    for a, b in zip(jax.tree.leaves(fr), jax.tree.leaves(f32)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))
    shapes = jax.eval_shape(lambda: params)
    assert jax.tree.leaves(split(shapes, labels, jnp.bfloat16)[1])[0].dtype == jnp.bfloat16
    ints = {"unet": {"step": jnp.zeros((), jnp.int32)}}
    assert split(ints, {"unet/step": "frozen"}, jnp.bfloat16)[1]["unet"]["step"].dtype == jnp.int32


@pytest.mark.slow  # a bfloat16 train step compile
def test_a_bfloat16_step_trains_on_bfloat16_frozen_weights():
    state, frozen, _, _, losses = _run(precision="bfloat16")
    assert np.isfinite(losses).all() and losses[1] != losses[0]
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow  # a train step compile each; the fast tier keeps the frozen/trainable split
def test_remat_gives_the_same_gradients():
    _, models, params, sd = _setup()
    x = image_to_model_range(jnp.asarray(_batch(sd, 2)["pixel_values"]))
    # Random text states: with identical ones every cross-attention is uniform, the
    # true gradients of its to_q / to_k / norm2 are exactly zero and what both runs
    # return there is rounding noise (1e-7), which no relative check can compare.
    t, ctx = jnp.array([1.0, 500.0]), jax.random.normal(jax.random.PRNGKey(3), (2, 16, 64))

    def loss(p, unet):
        return jnp.sum(unet.apply({"params": p}, x, t, ctx) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one program each, as training runs it
    g1 = grad(params["unet"], models.unet)
    g2 = grad(params["unet"], models.unet.clone(remat=True))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-6)


def test_lr_schedules():
    from cn_jax.train.state import learning_rate_schedule

    over = ["train.warmup_steps=10", "train.max_steps=110", "train.lr_schedule=cosine"]
    cfg = load_config(None, over).train
    sched = learning_rate_schedule(cfg, 1.0)
    assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
    assert abs(float(sched(60)) - 0.5) < 1e-6 and float(sched(110)) < 1e-6
    wc = learning_rate_schedule(cfg.model_copy(update={"lr_schedule": "warmup_constant"}), 1.0)
    assert abs(float(wc(5)) - 0.5) < 1e-6 and float(wc(1000)) == 1.0


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_clip_by_global_norm_equals_optax(max_norm):
    import optax

    from cn_jax.train.state import clip_by_global_norm, global_norm

    rng = np.random.default_rng(0)
    tree = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "b": jnp.ones((3,))}
    ours, state = clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    assert isinstance(state, optax.EmptyState)
    for k in tree:
        if max_norm > 1:  # within the norm: untouched, bit for bit
            np.testing.assert_array_equal(ours[k], tree[k])
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=0)
    clipped = float(global_norm(ours))
    assert abs(clipped - min(max_norm, float(global_norm(tree)))) <= 1e-6 * clipped
    # a non-finite norm gives what optax gives (NaN, or zero where the leaf is finite)
    for bad in (jnp.nan, jnp.inf):
        t = {**tree, "b": tree["b"].at[0].set(bad)}
        ours = clip_by_global_norm(max_norm).update(t, optax.EmptyState())[0]
        ref = optax.clip_by_global_norm(max_norm).update(t, optax.EmptyState())[0]
        for k in t:
            np.testing.assert_array_equal(ours[k], ref[k])


def test_clipping_fuses_into_the_update():
    """The clipped gradients are never a buffer of their own: the compiled
    clip + AdamW update needs almost no temporary memory beyond its arguments
    (with optax's select-based clip, XLA's CPU backend allocates a copy of the
    gradients)."""
    import optax

    from cn_jax.train.state import clip_by_global_norm

    params = {"w": jnp.ones((512, 512)), "b": jnp.ones((512,))}
    grads = jax.tree_util.tree_map(lambda p: p * 3.0, params)
    tx = optax.chain(clip_by_global_norm(1.0), optax.adamw(1e-3))

    def update(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    lowered = jax.jit(update, donate_argnums=(0, 2)).lower(params, grads, tx.init(params))
    compiled = lowered.compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    grad_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(grads))
    assert temp < 0.1 * grad_bytes, (temp, grad_bytes)
    p, s = compiled(params, grads, tx.init(params))
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(p))


def test_uint8_batch_trains_exactly_as_its_float_twin():
    """The loader sends uint8; the step maps it to floats bit-identical to the float32
    batch the host made before (x / 127.5 - 1, x / 255): the same loss and update."""
    batch = _batch(_setup()[3])
    twin = dict(
        batch,
        pixel_values=batch["pixel_values"].astype(np.float32) / np.float32(127.5) - 1.0,
        conditioning_pixel_values=batch["conditioning_pixel_values"] / np.float32(255.0),
    )
    a, b = _run(steps=1, batch=batch), _run(steps=1, batch=twin)
    assert a[4] == b[4]
    for k, v in _leaves(a[0].params).items():
        np.testing.assert_array_equal(v, _leaves(b[0].params)[k], err_msg=k)
