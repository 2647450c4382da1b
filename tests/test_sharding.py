"""Data parallel splits the native kernels' work (issue 20).

Under a batch-sharded ``jit`` each ``jaxdsc_*`` FFI call must see only its
device's shard (``custom_partitioning``, jaxdsc/ops/_partition.py): the
operand shapes of the custom calls in the compiled 8-device program are
per-shard (N / 8 examples, or N / 8 * H * W rows), weight gradients are
all-reduced partials, BatchNorm statistics all-reduced per-shard sums; and
the results equal the one-device program. Checked on a SeparableBlock
(forward, gradients, BatchNorm statistics) and on the trainer's own train
step (train/steps.py with its 1-D "data" mesh), in a subprocess with 8 CPU
devices.

Tolerance 1e-5 relative to the largest magnitude of each compared vector:
float32, the sharded program sums the batch in a different order (per-shard
partials, then an all-reduce); observed errors are below 2e-6.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxdsc.ops import native

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import re, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxdsc
    from jaxdsc.models import DSCNet
    from train import steps

    assert jax.device_count() == 8
    N, TOL = 16, 1e-5

    def calls(compiled):
        '''(target, first operand shape) of every jaxdsc_* custom call.'''
        out = []
        for line in compiled.as_text().splitlines():
            m = re.search(r'custom_call_target="(jaxdsc_\\w+)"', line)
            if m:
                shape = re.search(r"operand_layout_constraints=\\{\\w+\\[([\\d,]*)\\]", line).group(1)
                out.append((m.group(1), tuple(int(d) for d in shape.split(","))))
        return out

    def check_per_shard(found, pixels):
        '''Depthwise calls see N / 8 examples, pointwise (row) calls N / 8 * H * W rows.'''
        kinds = {t.split("_")[1] for t, _ in found}
        assert {"dw", "pw"} <= kinds, found
        for target, shape in found:
            want = {N // 8 * p for p in pixels} if target.startswith("jaxdsc_pw") else {N // 8}
            assert shape[0] in want, (target, shape, want)

    def close(a, b, what):
        a = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(a)])
        b = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(b)])
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= TOL, (what, err)

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    # 1. A SeparableBlock train-mode step: loss, gradients and BatchNorm statistics.
    blk = jaxdsc.SeparableBlock(8, 16, 3, kernel_dilation=2, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(blk, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((N, 32, 32, 8)), jnp.float32)

    def step(params, rest, x):
        def loss(p):
            m = nnx.merge(graph, p, rest)
            y = m(x)
            return jnp.mean(y * jnp.cos(y)), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
        (l, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        return l, g, stats

    # The checked executable is the one run: no second compile of the same program.
    sharded = jax.jit(step, in_shardings=(rep, rep, bat), out_shardings=rep).lower(params, rest, x).compile()
    check_per_shard(calls(sharded), {32 * 32})
    got, want = sharded(params, rest, x), jax.jit(step)(params, rest, x)
    for name, a, b in zip(("loss", "grads", "stats"), got, want):
        close(a, b, name)

    # 2. The trainer's train step on its 1-D data mesh, against the same step on one device.
    model = DSCNet(width=8, depth=1, rngs=nnx.Rngs(0))
    graph_train, graph_eval, params, stats, consts = steps.split_model(model)
    tx = optax.sgd(0.1, momentum=0.9)
    train_step = steps.make_train_step(graph_train, tx, lambda s: 0.1, num_classes=10,
                                       label_smoothing=0.1, crop_padding=4, flip=True, ema_decay=0.0)
    eval_step = steps.make_eval_step(graph_eval)
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, (N,), dtype=np.int32)}
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        m = Mesh(np.asarray(devices), ("data",))
        state = steps.create_state(params, stats, consts, tx, m, seed=0, ema=False)
        train, _ = steps.jit_steps(train_step, eval_step, m)
        b = {k: jax.device_put(v, steps.batch_sharded(m)) for k, v in batch.items()}
        if len(devices) == 8:
            train = train.lower(state, b).compile()  # run the checked executable itself
            check_per_shard(calls(train), {32 * 32, 16 * 16})
        new, metrics = train(state, b)
        results.append((steps.to_host(new.params), steps.to_host(new.batch_stats), float(metrics["loss"])))
    close(results[0][0], results[1][0], "trainer params")
    close(results[0][1], results[1][1], "trainer batch stats")
    assert abs(results[0][2] - results[1][2]) <= TOL * abs(results[1][2])
    print("ok")
""")


@pytest.mark.skipif(not native.available(), reason="native library not available: nothing to partition")
def test_native_calls_are_per_shard_and_results_unchanged():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok")
