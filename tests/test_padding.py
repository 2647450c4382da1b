"""The pure padding rules (jaxdsc/padding.py), checked against independent references.

References: XLA's own SAME / SAME_LOWER (``lax.padtype_to_pads``), output
shapes from ``jax.eval_shape`` of ``lax.conv_general_dilated``, NumPy's pad
modes, PyTorch's int padding (for SYMMETRIC), and the causality property.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jaxdsc
from jaxdsc.padding import (
    PADDING_NAMES,
    Padding,
    canonical_padding,
    output_size,
    resolve_padding,
    same_pair,
    to_json,
)

SWEEP = settings(max_examples=200, deadline=None, derandomize=True, database=None)

dims = st.tuples(
    st.integers(1, 40),  # n
    st.integers(1, 7),  # k
    st.integers(1, 3),  # s
    st.integers(1, 4),  # d
)


@SWEEP
@given(dims)
def test_same_pairs_equal_xla(dim):
    n, k, s, d = dim
    eff = d * (k - 1) + 1
    assert [same_pair(n, k, s, d)] == lax.padtype_to_pads((n,), (eff,), (s,), "SAME")
    assert [same_pair(n, k, s, d, lower=True)] == lax.padtype_to_pads((n,), (eff,), (s,), "SAME_LOWER")


@SWEEP
@given(dims)
def test_same_like_modes_give_ceil_n_over_s(dim):
    n, k, s, d = dim
    for name in ("SAME", "SAME_LOWER", "CIRCULAR", "REPLICATE", "REFLECT"):
        try:
            pad = resolve_padding(name, (n,), (k,), (s,), (d,))
        except ValueError:
            assert name in ("REFLECT", "CIRCULAR")  # only these refuse padding wider than the input
            continue
        ((lo, hi),) = pad.pairs
        assert output_size(n, k, s, d, lo, hi) == -(-n // s)
        assert abs(hi - lo) <= 1


@SWEEP
@given(dims, st.sampled_from([n for n in PADDING_NAMES if n != "CAUSAL"]))
def test_output_size_matches_xla_shape(dim, name):
    """``output_size`` (used for the "too small" error) agrees with XLA's shape rule."""
    n, k, s, d = dim
    try:
        pad = resolve_padding(name, (n,), (k,), (s,), (d,))
    except ValueError:
        return
    ((lo, hi),) = pad.pairs
    out = jax.eval_shape(
        lambda x, w: lax.conv_general_dilated(x, w, (s,), [(lo, hi)], rhs_dilation=(d,)),
        jax.ShapeDtypeStruct((1, 1, n), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, k), jnp.float32),
    )
    assert out.shape[-1] == output_size(n, k, s, d, lo, hi) >= 1


@pytest.mark.parametrize(("n", "k", "s", "d"), [(5, 3, 1, 1), (8, 4, 2, 2), (7, 7, 3, 1), (1, 2, 1, 4)])
def test_symmetric_is_pytorch_int_padding_independent_of_size(n, k, s, d):
    p = ((s - 1) + d * (k - 1)) // 2
    for size in (n, n + 1, n + 7):
        try:
            pad = resolve_padding("SYMMETRIC", (size,), (k,), (s,), (d,))
        except ValueError:  # too small even with padding; torch would refuse too
            continue
        assert pad == Padding(((p, p),), "constant")
    # The twin conv with SYMMETRIC equals torch's own padding=p.
    x = torch.randn(2, 3, n + 10, generator=torch.Generator().manual_seed(0))
    w = torch.randn(3, 1, k, generator=torch.Generator().manual_seed(1))
    from torch_bridge.nn import conv_nd

    ours = conv_nd(x, w, None, padding="SYMMETRIC", stride=(s,), dilation=(d,), groups=3)
    ref = F.conv1d(x, w, None, s, p, d, 3)
    assert torch.equal(ours, ref)


def test_causal_pairs_and_rank():
    assert resolve_padding("CAUSAL", (9,), (3,), (1,), (2,)) == Padding(((4, 0),), "constant")
    with pytest.raises(ValueError, match=r"CAUSAL.*1-D.*2-D"):
        canonical_padding("causal", 2)


@pytest.mark.parametrize(("k", "d", "s"), [(3, 1, 1), (3, 2, 1), (2, 3, 1), (4, 2, 2)])
def test_causal_output_never_sees_the_future(k, d, s):
    conv = jaxdsc.DepthwiseConv(2, (k,), strides=s, kernel_dilation=d, padding="CAUSAL",
                                rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((1, 12, 2)).astype(np.float32)
    y = np.asarray(conv(jnp.asarray(x)))
    for t in range(12):
        x2 = x.copy()
        x2[:, t + 1 :] = 100.0  # change only the future of input step t
        y2 = np.asarray(conv(jnp.asarray(x2)))
        seen = t // s + 1  # outputs j with j*s <= t only read inputs <= t
        np.testing.assert_array_equal(y2[:, :seen], y[:, :seen])
        if t + 1 < 12 and seen < y.shape[1]:
            assert not np.array_equal(y2[:, seen:], y[:, seen:])  # the test can fail


@pytest.mark.parametrize(("name", "np_mode"), [("CIRCULAR", "wrap"), ("REFLECT", "reflect"), ("REPLICATE", "edge")])
def test_fill_modes_match_numpy_pad(name, np_mode):
    """A 1x1-identity kernel with VALID after padding: the padded values, as NumPy fills them."""
    x = np.arange(1.0, 8.0, dtype=np.float32).reshape(1, 7, 1)
    pad = resolve_padding(name, (7,), (5,), (1,), (1,))
    assert pad.mode == name.lower() and pad.pairs == ((2, 2),)
    from jaxdsc.conv import pad_input

    padded, zeros = pad_input(jnp.asarray(x), name, (5,), (1,), (1,))
    assert zeros == ((0, 0),)
    np.testing.assert_array_equal(np.asarray(padded)[0, :, 0], np.pad(x[0, :, 0], 2, mode=np_mode))
    torch_padded = F.pad(torch.from_numpy(x.transpose(0, 2, 1)), [2, 2], mode=name.lower())
    np.testing.assert_array_equal(torch_padded[0, 0].numpy(), np.pad(x[0, :, 0], 2, mode=np_mode))


def test_canonical_forms():
    assert canonical_padding("same", 2) == "SAME"
    assert canonical_padding("Same_Lower", 1) == "SAME_LOWER"
    assert canonical_padding(2, 3) == ((2, 2),) * 3
    assert canonical_padding((1, (0, 2)), 2) == ((1, 1), (0, 2))
    assert canonical_padding([[1, 2]], 1) == ((1, 2),)
    assert canonical_padding(np.int64(1), 1) == ((1, 1),)
    for spec in ("VALID", ((1, 2), (3, 4))):
        canonical = canonical_padding(spec, 2)
        assert canonical_padding(to_json(canonical), 2) == canonical


@pytest.mark.parametrize(
    ("spec", "rank", "error", "match"),
    [
        ("FULL", 2, ValueError, r"padding must be one of .*got 'FULL'"),
        (-1, 2, ValueError, r"padding must be >= 0, got -1"),
        (True, 2, TypeError, r"padding must be .*got True"),
        (1.5, 2, TypeError, r"padding must be .*got 1\.5"),
        ((1, 1, 1), 2, ValueError, r"padding must have 2 entries .*got 3"),
        (((1, 1, 1), 0), 2, TypeError, r"padding\[0\] must be an int or a \(lo, hi\) pair"),
        (((1, -1), 0), 2, ValueError, r"padding\[0\] must be non-negative, got \(1, -1\)"),
        ((("a", 1), 0), 2, TypeError, r"padding\[0\]"),
        (((True, 1), 0), 2, TypeError, r"padding\[0\]"),
        ((1, 2), 1, ValueError, r"padding must have 1 entries"),
    ],
)
def test_canonical_errors(spec, rank, error, match):
    with pytest.raises(error, match=match):
        canonical_padding(spec, rank)


def test_resolve_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"too small: dim 1 has size 2.*effective kernel size 5"):
        resolve_padding("VALID", (9, 2), (3, 3), (1, 1), (1, 2))
    with pytest.raises(ValueError, match=r"REFLECT padding \(1, 1\) must be smaller than the input size 1"):
        resolve_padding("REFLECT", (1,), (3,), (1,), (1,))
    with pytest.raises(ValueError, match=r"CIRCULAR padding \(3, 3\) must not exceed the input size 2"):
        resolve_padding("CIRCULAR", (2,), (7,), (1,), (1,))
    # Circular padding equal to the size is fine in both frameworks.
    assert resolve_padding("CIRCULAR", (2,), (5,), (1,), (1,)).pairs == ((2, 2),)


def test_is_zero():
    assert resolve_padding("VALID", (5, 5), (3, 3), (1, 1), (1, 1)).is_zero
    assert resolve_padding("SAME", (5, 5), (1, 1), (1, 1), (1, 1)).is_zero
    assert not resolve_padding("SAME", (5, 5), (3, 1), (1, 1), (1, 1)).is_zero
