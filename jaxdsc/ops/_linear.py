"""Linear maps with a hand-written transpose: forward and reverse mode, any order.

The fast kernels are opaque to JAX (FFI calls) or have faster closed-form
backward passes than autodiff would derive. ``jax.custom_vjp`` states their
backward pass but rules out forward mode (``jax.jvp``, ``jax.linearize``,
forward-over-reverse Hessian-vector products). Here each kernel is instead a
``jax.custom_jvp`` whose tangent is a :class:`Linear` map: a primitive that JAX
knows to be linear in its tangent operands and that carries its own transpose.

* forward mode evaluates the tangent map;
* reverse mode (``jax.grad``) linearises through the same rule and transposes
  the tangent map with the hand-written transpose (the fused backward kernels);
* the tangent map and its transpose are written with differentiable ops (the
  wrapped kernels again, or ``jnp``), so every further derivative, in either
  mode, goes through the same machinery;
* ``jax.vmap`` maps the tangent map and its transpose; the wrapped kernels
  are mapped as ``jax.custom_jvp`` maps its primal function.

Tangents that are symbolically zero (an input not being differentiated, e.g.
the data into the first layer) never reach a kernel: the maps receive
``None`` for them, and the transpose is told which cotangents are needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

Arrays = tuple[Any, ...]
Apply = Callable[[Arrays, Arrays], Arrays]
Transpose = Callable[[Arrays, Arrays, tuple[bool, ...]], Arrays]


@dataclass(frozen=True, eq=False)  # compared by identity: a static primitive parameter
class Linear:
    """A map ``apply(res, lin) -> outs``, linear in ``lin`` for fixed residuals ``res``.

    ``apply`` receives ``None`` for absent (zero) entries of ``lin``.
    ``transpose(res, cts, needed)`` returns one cotangent per entry of ``lin``
    (``None`` where ``needed`` is False); ``cts`` are arrays (zeros made
    explicit). Both must be built from differentiable JAX operations.
    """

    apply: Apply
    transpose: Transpose
    name: str = "linear"


def linear_call(spec: Linear, res: Sequence[Any], lin: Sequence[Any | None]) -> Arrays:
    """``spec.apply(res, lin)`` as one primitive JAX can transpose (``None``: zero)."""
    present = tuple(t is not None for t in lin)
    operands = [*res, *(t for t in lin if t is not None)]
    return tuple(_linear_p.bind(*operands, spec=spec, num_res=len(res), present=present))


def _split(args: Sequence[Any], num_res: int, present: tuple[bool, ...]) -> tuple[Arrays, Arrays]:
    res, given = tuple(args[:num_res]), iter(args[num_res:])
    return res, tuple(next(given) if p else None for p in present)


def _apply_flat(*args, spec: Linear, num_res: int, present: tuple[bool, ...]) -> list[Any]:
    return list(spec.apply(*_split(args, num_res, present)))


@functools.lru_cache(maxsize=4096)
def _out_avals(spec: Linear, num_res: int, present: tuple[bool, ...], in_avals: tuple) -> tuple:
    shapes = jax.eval_shape(
        functools.partial(_apply_flat, spec=spec, num_res=num_res, present=present),
        *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals),
    )
    return tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in shapes)


def _abstract_eval(*avals, spec, num_res, present):
    return list(_out_avals(spec, num_res, present, tuple(avals)))


def _jvp(primals, tangents, *, spec, num_res, present):
    outs = _linear_p.bind(*primals, spec=spec, num_res=num_res, present=present)
    res, lin = _split(primals, num_res, present)
    dres, dlin = _split(tangents, num_res, present)
    terms = []
    # Linear in lin: the tangent along lin is the map itself.
    dlin = tuple(None if t is None or type(t) is ad.Zero else t for t in dlin)
    if any(t is not None for t in dlin):
        terms.append(linear_call(spec, res, dlin))
    # Along res: differentiate apply, whose ops are differentiable (and carry
    # their own linear tangents, so this part transposes too).
    dres = tuple(None if type(t) is ad.Zero else t for t in dres)
    if any(t is not None for t in dres):
        terms.append(jvp_along(lambda *r: tuple(spec.apply(r, lin)), res, dres)[1])
    if not terms:
        return outs, [ad.Zero(jax.core.ShapedArray(o.shape, o.dtype)) for o in outs]
    total = terms[0] if len(terms) == 1 else tuple(a + b for a, b in zip(*terms, strict=True))
    return outs, list(total)


def jvp_along(fn: Callable[..., Any], args: Sequence[Any], tangents: Sequence[Any | None]) -> Any:
    """``jax.jvp(fn, args, tangents)`` moving only the arguments whose tangent is not None."""
    moving = [i for i, t in enumerate(tangents) if t is not None]

    def moved_fn(*moved):
        full = list(args)
        for i, m in zip(moving, moved, strict=True):
            full[i] = m
        return fn(*full)

    return jax.jvp(moved_fn, [args[i] for i in moving], [tangents[i] for i in moving])


def _transpose(cts, *args, spec, num_res, present):
    res = tuple(args[:num_res])
    given = args[num_res:]
    if any(ad.is_undefined_primal(r) for r in res):
        raise ValueError(f"{spec.name}: transpose with respect to a residual operand")
    undefined = iter(ad.is_undefined_primal(t) for t in given)
    needed = tuple(p and next(undefined) for p in present)
    lin_avals = iter(t.aval for t in given if ad.is_undefined_primal(t))
    if all(type(c) is ad.Zero for c in cts):
        out = [ad.Zero(next(lin_avals)) if n else None for n in needed]
    else:
        cts = tuple(ad.instantiate_zeros(c) for c in cts)
        out = list(spec.transpose(res, cts, needed))
    result = [None] * num_res
    for p, n, ct in zip(present, needed, out, strict=True):
        if p:
            result.append(ct if n else None)
    return result


@functools.lru_cache(maxsize=1024)
def _vmapped(spec: Linear, res_axes: tuple[int | None, ...], present: tuple[bool, ...]) -> Linear:
    """``spec`` per example: residuals batched on ``res_axes``, tangents on axis 0."""
    lin_axes = tuple(0 if p else None for p in present)

    def apply(res, lin):
        return jax.vmap(spec.apply, in_axes=(res_axes, lin_axes))(res, lin)

    def transpose(res, cts, needed):
        return jax.vmap(lambda r, c: spec.transpose(r, c, needed), in_axes=(res_axes, 0))(res, cts)

    return Linear(apply, transpose, f"vmap({spec.name})")


def _batch(args, dims, *, spec, num_res, present):
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    res, lin = list(args[:num_res]), list(args[num_res:])
    res_axes = []
    for i, d in enumerate(dims[:num_res]):
        res_axes.append(None if d is None else 0)
        if d is not None:
            res[i] = jnp.moveaxis(res[i], d, 0)
    # Every tangent operand batched, so each example's transpose returns its own
    # cotangent (the broadcast of an unbatched one transposes to the sum).
    for i, d in enumerate(dims[num_res:]):
        if d is None:
            lin[i] = jnp.broadcast_to(lin[i], (size, *lin[i].shape))
        else:
            lin[i] = jnp.moveaxis(lin[i], d, 0)
    batched = _vmapped(spec, tuple(res_axes), present)
    outs = _linear_p.bind(*res, *lin, spec=batched, num_res=num_res, present=present)
    return outs, [0] * len(outs)


_linear_p = Primitive("jaxdsc_linear")
_linear_p.multiple_results = True
_linear_p.def_impl(_apply_flat)
_linear_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[_linear_p] = _jvp
ad.primitive_transposes[_linear_p] = _transpose
batching.primitive_batchers[_linear_p] = _batch
mlir.register_lowering(_linear_p, mlir.lower_fun(_apply_flat, multiple_results=True))


# ------------------------------------------------------------ wrappers --


def custom_linear_jvp(
    primal: Callable[..., Any],
    tangent: Linear,
    residuals: Callable[[Arrays, Any], Arrays] | None = None,
) -> Callable[..., Any]:
    """``primal(*args)`` whose tangent is ``tangent.apply(residuals, tangents)``.

    ``residuals(args, out)`` picks what the tangent map and its transpose need
    (default: the arguments); under ``jax.grad`` exactly these are kept for the
    backward pass. ``primal`` returns an array or a tuple of arrays;
    ``tangent.apply`` always returns a tuple.
    """

    def normalised(*args):  # FFI calls return lists; the tangent is a tuple
        out = primal(*args)
        return tuple(out) if isinstance(out, list) else out

    f = jax.custom_jvp(normalised)

    def rule(primals, tangents):
        out = f(*primals)
        lin = tuple(None if type(t) is SymbolicZero else t for t in tangents)
        res = tuple(primals) if residuals is None else tuple(residuals(tuple(primals), out))
        dout = linear_call(tangent, res, lin)
        return out, (dout if isinstance(out, tuple) else dout[0])

    f.defjvp(rule, symbolic_zeros=True)
    return f


def jvp_of(reference: Callable[..., Any], num_args: int) -> Apply:
    """The tangent map of ``reference`` (differentiable ``jnp`` code) at the first ``num_args`` residuals."""

    def as_tuple(*args):
        out = reference(*args)
        return out if isinstance(out, tuple) else (out,)

    def apply(res, lin):
        return jvp_along(as_tuple, res[:num_args], lin)[1]

    return apply


def fast_primal(fast: Callable[..., Any], reference: Callable[..., Any]) -> Callable[..., Any]:
    """``fast(*args)`` for values; derivatives of any order and mode are ``reference``'s.

    Under differentiation the primal value comes from ``reference`` too (it is
    computed anyway), so a fused forward kernel need not have a backward.
    """
    f = jax.custom_jvp(fast)

    def rule(primals, tangents):
        return jvp_along(reference, primals, [None if type(t) is SymbolicZero else t for t in tangents])

    f.defjvp(rule, symbolic_zeros=True)
    return f
