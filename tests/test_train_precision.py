"""Mixed precision: bfloat16 compute with float32 master weights, in the model and in a whole run."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jax_call
from flax import nnx

from jaxdsc.ops.native_pointwise import bf16_kernels_available
from train import cli
from train.checkpointing import read_arrays
from train.config import Config, ConfigError, ModelConfig, validate
from train.model import build
from train.testing import write_cifar10


def test_bfloat16_model_computes_in_bfloat16_with_float32_params():
    cfg32 = ModelConfig(width=8, depth=1, precision="float32")
    cfg16 = ModelConfig(width=8, depth=1, precision="bfloat16")
    m32, m16 = build(cfg32, seed=0), build(cfg16, seed=0)
    p32, p16 = nnx.state(m32, nnx.Param), nnx.state(m16, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
    # Same seed, same float32 weights: only the compute dtype differs.
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    m32.eval()
    m16.eval()
    x = np.random.default_rng(1).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    y32, y16 = np.asarray(jax_call(m32, x)), np.asarray(jax_call(m16, x))  # jitted: no per-op compiles
    assert y16.dtype == np.float32  # logits come back in float32 for the loss
    err = np.abs(y16 - y32).max() / np.abs(y32).max()
    # bf16 has an 8-bit mantissa (rel. step 2^-8 = 4e-3): a few layers of it give ~1e-2. An error of
    # 0 would mean bf16 was never used; above 0.1 the compute would be broken.
    assert 1e-4 < err < 0.1, err


def test_bfloat16_run_learns_and_saves_float32(tmp_path):
    data = tmp_path / "cifar"
    write_cifar10(data, 256, 64)
    workdir = tmp_path / "run"
    args = ["--preset", "tiny", "--data-dir", str(data), "--workdir", str(workdir), "--no-progress",
            "--train-limit", "0", "--test-limit", "0", "--batch-size", "32", "--epochs", "2",
            "--no-plot", "--precision", "bfloat16", "--optimizer", "adamw", "--lr", "0.005"]
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    arrays, _ = read_arrays(workdir)
    kernels = {k: v for k, v in arrays.items() if k.startswith("params") and k.endswith("kernel")}
    assert kernels and all(v.dtype == np.float32 for v in kernels.values())


def test_bf16_matmul_model_rounds_only_the_pointwise_products():
    m32 = build(ModelConfig(width=8, depth=1), seed=0)
    mmm = build(ModelConfig(width=8, depth=1, precision="bf16-matmul"), seed=0)
    for a, b in zip(jax.tree.leaves(nnx.state(m32)), jax.tree.leaves(nnx.state(mmm)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    m32.eval()
    mmm.eval()
    x = np.random.default_rng(2).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    y32, ymm = np.asarray(jax_call(m32, x)), np.asarray(jax_call(mmm, x))
    assert ymm.dtype == np.float32
    err = np.abs(ymm - y32).max() / np.abs(y32).max()
    if bf16_kernels_available():
        # Stage 1's pointwise convs (4096 rows: the native GEMM) multiply bfloat16-rounded operands.
        assert 1e-5 < err < 5e-2, err
    else:
        assert err == 0  # without AMX or AVX512-BF16 the preset computes in float32, as XLA:CPU does


def test_bf16_matmul_is_for_dscnet():
    cfg = Config()
    zoo = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model="torchvision:mobilenet_v2",
                                                             precision="bf16-matmul"))
    with pytest.raises(ConfigError, match="bf16-matmul is for DSCNet"):
        validate(zoo)
