"""Shared checks for the model-zoo parity tests (upstream PyTorch model <-> jaxdsc zoo model).

Every check compares a converted JAX model with the upstream instance it came from:

* :func:`randomize` gives the upstream model random weights, biases, BatchNorm affine
  parameters AND running statistics (never the 0/1 defaults, which would hide a swapped
  mean/var or a wrong eps), so the eval-mode comparison exercises every tensor.
* :func:`check_eval`: eval-mode outputs within ``EVAL_RTOL = 1e-5`` of ``max |y|``. float32
  has unit roundoff 6e-8; XLA and oneDNN sum convolutions in different orders through
  ~50 layers, which gives errors of a few 1e-7 to 1e-6 relative to the output scale. Any
  wrong tap, padding, channel order or statistic gives errors of order 1.
* :func:`check_train`: train mode (batch statistics; dropout and stochastic depth off on both
  sides) outputs and updated running statistics within ``TRAIN_RTOL = 1e-4`` in float32
  (normalising by batch statistics divides by small variances), and, with ``grads=True``,
  gradients of ``sum(y * r)`` with respect to the input and every parameter.
  Gradients are compared in float64 (``GRAD_RTOL64 = 1e-9``): in float32 the backward pass
  through ~50 train-mode BatchNorms with random weights amplifies roundoff by up to ~1e4 (the
  measured float32 errors wander between 7e-5 and 1.3e-3 with the random init, while the
  float64 comparison of the very same models agrees to ~1e-12). float64 proves the two
  computations are the same function; 1e-9 leaves 1e3 of margin over the measured 1e-12 and
  is 1e8 below any real mistake.
* :func:`check_roundtrips`: torch -> JAX -> torch and JAX -> torch -> JAX bit-exact on every tensor.
* :func:`check_files`: ``torch_bridge.save`` of either side loads into the upstream class with
  ``strict=True`` (plain ``safetensors.torch.load_file``) and back with ``torch_bridge.load``,
  bit-exact.

JAX forwards are jitted (an eager pass through a zoo model dispatches hundreds of ops).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.torch
import torch
from flax import nnx

import torch_bridge
from torch_bridge.convert import torch_state_dict
from torch_bridge.zoo import family_for_name

EVAL_RTOL = 1e-5
TRAIN_RTOL = 1e-4
GRAD_RTOL64 = 1e-9
GRAD_FLOOR = 1e-3


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random biases, BatchNorm affine parameters and running statistics (weights keep upstream's
    random init, whose scale keeps activations finite through the depth)."""
    g = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=t.dtype)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(rand(m.weight, 0.5, 1.5))
                m.bias.copy_(rand(m.bias, -0.2, 0.2))
                m.running_mean.copy_(rand(m.running_mean, -0.2, 0.2))
                m.running_var.copy_(rand(m.running_var, 0.5, 2.0))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(rand(m.bias, -0.2, 0.2))
    return model


def rel_err(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max()
    return float(np.abs(got - want).max() / (scale if scale > 0 else 1.0))


def tree_map_outputs(fn: Callable[[Any, Any], Any], jax_out: Any, torch_out: Any) -> Any:
    """Apply ``fn(jax_array_nhwc_or_2d, torch_tensor)`` to matching outputs (tensor or dict)."""
    if isinstance(torch_out, dict):
        assert set(jax_out) == set(torch_out), (sorted(jax_out), sorted(torch_out))
        return {k: fn(jax_out[k], torch_out[k]) for k in torch_out}
    return fn(jax_out, torch_out)


def _to_torch_layout(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return nhwc_to_nchw(a) if a.ndim == 4 else a


def jax_forward(model: nnx.Module, x_nhwc: np.ndarray) -> Any:
    """``model(x)`` under ``nnx.jit`` (state updates, e.g. BatchNorm statistics, applied to ``model``)."""
    return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x_nhwc))


def check_eval(torch_model: torch.nn.Module, jax_model: nnx.Module, x: np.ndarray,
               rtol: float = EVAL_RTOL) -> float:
    """Eval-mode outputs (``x`` NCHW float32); returns the worst relative error."""
    torch_model.eval()
    jax_model.eval()
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x))
    got = jax_forward(jax_model, nchw_to_nhwc(x))
    errs = tree_map_outputs(lambda g, w: rel_err(_to_torch_layout(g), w.numpy()), got, want)
    worst = max(errs.values()) if isinstance(errs, dict) else errs
    assert worst <= rtol, f"eval outputs differ: {errs} > {rtol}"
    return worst


def _stochastic_off(torch_model: torch.nn.Module, jax_model: nnx.Module) -> None:
    torch_model.train()
    for m in torch_model.modules():
        if isinstance(m, torch.nn.Dropout) or type(m).__name__ in ("StochasticDepth", "DropPath"):
            m.eval()
    jax_model.train()
    jax_model.set_attributes(deterministic=True, raise_if_not_found=False)


def check_train(torch_model: torch.nn.Module, jax_model: nnx.Module, x: np.ndarray, seed: int = 1,
                rtol: float = TRAIN_RTOL, grads: bool = False) -> dict[str, float]:
    """Train-mode forward and updated running statistics; with ``grads``, also the gradients of
    ``sum(y * r)`` wrt the input and every parameter (``x`` NCHW; float64 models and input for
    the gradient check, see the module docstring). Mutates both models' BatchNorm statistics."""
    _stochastic_off(torch_model, jax_model)
    if not grads:
        return _check_train_forward(torch_model, jax_model, x, rtol)
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = torch_model(xt)
    outs_t = out_t if isinstance(out_t, dict) else {"y": out_t}
    rng = np.random.default_rng(seed)
    weights = {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in outs_t.items()}
    loss_t = sum((v * torch.from_numpy(weights[k])).sum() for k, v in outs_t.items())
    torch_model.zero_grad()
    loss_t.backward()

    w_nhwc = {k: jnp.asarray(nchw_to_nhwc(w) if w.ndim == 4 else w) for k, w in weights.items()}

    def loss(model: nnx.Module, xj: jax.Array) -> tuple[jax.Array, Any]:
        out = model(xj)
        outs = out if isinstance(out, dict) else {"y": out}
        return sum(jnp.sum(v * w_nhwc[k]) for k, v in outs.items()), outs

    step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, outs_j), (g_params, g_x) = step(jax_model, jnp.asarray(nchw_to_nhwc(x)))  # updates the statistics
    errs: dict[str, float] = {}
    for k, v in outs_t.items():
        errs[f"out:{k}"] = rel_err(_to_torch_layout(outs_j[k]), v.detach().numpy())
    errs["grad:input"] = rel_err(nhwc_to_nchw(np.asarray(g_x)), xt.grad.numpy())
    # Gradients and updated statistics in PyTorch layout, through the bridge's own walker.
    graphdef, _, rest = nnx.split(jax_model, nnx.Param, ...)
    grads = torch_state_dict(nnx.merge(graphdef, g_params, rest))
    worst_grad = 0.0
    # A parameter whose gradient is zero in exact arithmetic (the shift of a BatchNorm feeding
    # another train-mode BatchNorm) holds roundoff noise; scale each tensor's error by its own
    # largest gradient, but at least GRAD_FLOOR of the largest parameter gradient.
    # An unused parameter (a backbone's classifier inside DeepLabV3+) has no torch grad: zero.
    torch_grads = {n: np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy().astype(np.float64)
                   for n, p in torch_model.named_parameters()}
    floor = GRAD_FLOOR * max(float(np.abs(g).max()) for g in torch_grads.values())
    for name, g_t in torch_grads.items():
        scale = max(float(np.abs(g_t).max()), floor)
        worst_grad = max(worst_grad, float(np.abs(np.asarray(grads[name], np.float64) - g_t).max()) / scale)
    errs["grad:params"], errs["running_stats"] = worst_grad, _check_running_stats(torch_model, jax_model)
    bad = {k: v for k, v in errs.items() if not v <= rtol}
    assert not bad, f"train-mode mismatches above {rtol}: {bad}"
    return errs


def _check_running_stats(torch_model: torch.nn.Module, jax_model: nnx.Module) -> float:
    stats = torch_state_dict(jax_model)
    worst = 0.0
    for name, b in torch_model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            worst = max(worst, rel_err(stats[name], b.numpy()))
        elif name.endswith("num_batches_tracked"):
            assert int(stats[name]) == int(b), name
    return worst


def _check_train_forward(torch_model: torch.nn.Module, jax_model: nnx.Module, x: np.ndarray,
                         rtol: float) -> dict[str, float]:
    with torch.no_grad():
        out_t = torch_model(torch.from_numpy(x))
    out_j = jax_forward(jax_model, nchw_to_nhwc(x))
    errs = tree_map_outputs(lambda g, w: rel_err(_to_torch_layout(g), w.numpy()), out_j, out_t)
    errs = {f"out:{k}": v for k, v in errs.items()} if isinstance(errs, dict) else {"out:y": errs}
    errs["running_stats"] = _check_running_stats(torch_model, jax_model)
    bad = {k: v for k, v in errs.items() if not v <= rtol}
    assert not bad, f"train-mode mismatches above {rtol}: {bad}"
    return errs


def assert_state_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same keys, shapes, dtypes and bits."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        x = a[k].detach().numpy() if isinstance(a[k], torch.Tensor) else np.asarray(a[k])
        y = b[k].detach().numpy() if isinstance(b[k], torch.Tensor) else np.asarray(b[k])
        assert x.shape == y.shape and x.dtype == y.dtype, (k, x.shape, y.shape, x.dtype, y.dtype)
        assert x.tobytes() == y.tobytes(), f"{k} differs"


def jax_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every non-RNG Variable of ``model`` by path, as NumPy."""
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model)) if not isinstance(v, nnx.RngState)}


def check_roundtrips(torch_model: torch.nn.Module, jax_model: nnx.Module | None = None) -> nnx.Module:
    """torch -> JAX -> torch and JAX -> torch -> JAX, bit-exact; returns the JAX model of ``torch_model``."""
    jm = torch_bridge.from_torch(torch_model) if jax_model is None else jax_model
    back = torch_bridge.to_torch(jm)
    assert type(back) is type(torch_model)
    assert_state_equal(back.state_dict(), torch_model.state_dict())
    again = torch_bridge.from_torch(back)
    assert again.model_name == jm.model_name and again.config == jm.config
    assert_state_equal(jax_state(again), jax_state(jm))
    return jm


def check_files(torch_model: torch.nn.Module, jax_model: nnx.Module, tmp_path: Any) -> None:
    """save() of both sides -> upstream class with strict=True, and load() both ways, bit-exact."""
    for i, source in enumerate((jax_model, torch_model)):
        path = tmp_path / f"m{i}.safetensors"
        torch_bridge.save(source, path)
        # The upstream constructor itself (e.g. torchvision.models.mobilenet_v2(**config)).
        fresh = family_for_name(jax_model.model_name).build_torch(jax_model.model_name, jax_model.config)
        fresh.load_state_dict(safetensors.torch.load_file(path), strict=True)
        assert_state_equal(fresh.state_dict(), torch_model.state_dict())
        assert_state_equal(torch_bridge.load(path, "torch").state_dict(), torch_model.state_dict())
        loaded = torch_bridge.load(path, "jax")
        assert loaded.model_name == jax_model.model_name and loaded.config == jax_model.config
        assert_state_equal(jax_state(loaded), jax_state(jax_model))
