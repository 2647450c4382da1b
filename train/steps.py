"""Pure, jitted train and eval steps over a pytree :class:`TrainState`.

The model's graph (``nnx.GraphDef``) is static and closed over; everything
that changes is in the state, as plain dicts of arrays:

* ``train_step(state, batch) -> (state, metrics)``: augmentation (keyed by
  ``fold_in(seed_key, state.step)``), forward in train mode (BatchNorm uses
  batch statistics and updates its running ones), loss with label smoothing,
  gradients, optax update, optional EMA. The state buffers are donated. A
  step whose loss, gradients or BN statistics are not finite is *skipped*:
  params, BN statistics, optimizer and EMA state stay as they were, only the
  step counter advances (``metrics["finite"]`` is 0).
* ``eval_step(state, batch) -> sums``: eval mode (running statistics), EMA
  weights when enabled; masked sums so a padded last batch counts exactly.

Both are compiled once for a whole run (:data:`TRACES` counts traces) and
run as one SPMD program over a device mesh: the batch is sharded on its
first axis, the state replicated; XLA inserts the gradient / BN all-reduces.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.augment import augment, to_float
from train.resize import resize
from train.tta import tta_logits

TRACES: collections.Counter[str] = collections.Counter()
"""How often each step function was traced in this process (1 per run is the goal)."""

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates done (skipped ones included)
    params: Any  # nnx.Param values, nested dict
    batch_stats: Any  # nnx.BatchStat values (running mean/var, counters)
    consts: Any  # fixed model constants (normalisation statistics)
    opt_state: Any
    ema: Any  # None or {"params": ..., "batch_stats": ...}
    rng: jax.Array  # uint32 key data of the base key; step k uses fold_in(key, k - 1)
    skipped: jax.Array  # int32 scalar: non-finite steps skipped so far


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef[Any], nnx.GraphDef[Any], Any, Any, Any]:
    """``(train graphdef, eval graphdef, params, batch_stats, consts)`` of a model, as pure dicts."""
    model.eval()
    graph_eval, *_ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.train()
    graph_train, params, stats, consts = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    pure = nnx.to_pure_dict
    return graph_train, graph_eval, pure(params), pure(stats), pure(consts)


def init_state(params: Any, batch_stats: Any, consts: Any, tx: optax.GradientTransformation, *,
               seed: int, ema: bool) -> TrainState:
    copy = lambda t: jax.tree_util.tree_map(jnp.array, t)  # noqa: E731 - own buffers (donation)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        consts=consts,
        opt_state=tx.init(params),
        ema={"params": copy(params), "batch_stats": copy(batch_stats)} if ema else None,
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
    )


def create_state(params: Any, batch_stats: Any, consts: Any, tx: optax.GradientTransformation, mesh: Mesh, *,
                 seed: int, ema: bool) -> TrainState:
    """:func:`init_state` as one compiled program, replicated over ``mesh`` (the steps' exact input layout)."""
    init = functools.partial(init_state, tx=tx, seed=seed, ema=ema)
    return jax.jit(init, out_shardings=replicated(mesh))(params, batch_stats, consts)


def to_host(tree: Any) -> Any:
    """NumPy copies of replicated arrays; works on multi-host meshes (reads the local replica)."""

    def get(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x  # RNG stream keys of zoo models (no NumPy form; the step reseeds them anyway)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)


def applied_updates(state: TrainState) -> jax.Array:
    """Updates the optimizer has applied (its schedule's step): steps done minus steps skipped."""
    return state.step - state.skipped


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _ema_update(ema: Any, new: Any, decay: jax.Array) -> Any:
    def upd(e: jax.Array, n: jax.Array) -> jax.Array:
        if not jnp.issubdtype(e.dtype, jnp.inexact):
            return n  # counters follow the live model
        return (decay * e + (1 - decay) * n).astype(e.dtype)

    return jax.tree_util.tree_map(upd, ema, new)


def reseed(model: nnx.Module, key: jax.Array) -> None:
    """Fresh keys for the model's RNG streams (dropout, stochastic depth of zoo models) from the
    step's key: their keys live in the constant part of the state, which a step does not update."""
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.fold_in(jax.random.fold_in(key, 0x5EED), i))


def apply_update(state: TrainState, tx: optax.GradientTransformation, loss: jax.Array, grads: Any,
                 stats: Any, ema_decay: float) -> tuple[TrainState, jax.Array]:
    """The optax update, BN statistics and EMA of one step, or (if anything is not finite) the
    old state with only ``step`` and ``skipped`` advanced; and the finite flag."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(stats) & all_finite(params)
    ema = state.ema
    if ema is not None:
        # Warm-up of the EMA decay (TF/timm): early on the average follows the fast-moving weights.
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        ema = _ema_update(ema, {"params": params, "batch_stats": stats}, decay)
    new = state.replace(params=params, batch_stats=stats, opt_state=opt_state, ema=ema)
    keep = lambda n, o: jnp.where(finite, n, o)  # noqa: E731
    new = jax.tree_util.tree_map(keep, new, state)
    return new.replace(step=state.step + 1, skipped=state.skipped + (~finite).astype(jnp.int32)), finite


def make_train_step(graph_train: nnx.GraphDef[Any], tx: optax.GradientTransformation,
                    lr_schedule: Callable[[Any], Any], *, num_classes: int, label_smoothing: float,
                    crop_padding: int, flip: bool, ema_decay: float,
                    input_fn: Callable[[jax.Array], jax.Array] | None = None, image_size: int | None = None,
                    cutout: int = 0) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The (unjitted) pure train step; see :func:`jit_steps`. ``input_fn`` maps the augmented
    ``[0, 1]`` images to the model's input (zoo models: mean/std normalisation); ``image_size``
    downscales them first (:func:`train.resize.resize`; progressive resizing)."""
    to_model = input_fn or (lambda x: x)
    input_fn = to_model if image_size is None else (lambda x: to_model(resize(x, image_size)))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        TRACES["train_step"] += 1
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        images = input_fn(augment(batch["image"], key, padding=crop_padding, flip=flip, cutout=cutout))
        labels = batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            model = nnx.merge(graph_train, params, state.batch_stats, state.consts)
            reseed(model, key)
            logits = model(images)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new, finite = apply_update(state, tx, loss, grads, stats, ema_decay)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "finite": finite.astype(jnp.int32),
            "grad_norm": optax.tree.norm(grads),
            # The optimizer's schedule counts applied updates only: skipped steps do not advance it.
            "lr": jnp.asarray(lr_schedule(applied_updates(state)), jnp.float32),
        }
        return new, metrics

    return train_step


def eval_weights(state: TrainState) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` that evaluations score and exports write: the EMA's when the run keeps one."""
    return state.ema if state.ema is not None else {"params": state.params, "batch_stats": state.batch_stats}


def eval_logits(graph_eval: nnx.GraphDef[Any], state: TrainState, images: jax.Array,
                input_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Eval-mode outputs for uint8 images, with the EMA weights when the run keeps them."""
    return eval_logits_tta(graph_eval, state, images, input_fn, "none")[0]


def eval_logits_tta(graph_eval: nnx.GraphDef[Any], state: TrainState, images: jax.Array,
                    input_fn: Callable[[jax.Array], jax.Array], tta: str) -> tuple[jax.Array, jax.Array]:
    """``(test-time-augmented logits, plain logits)`` (:mod:`train.tta`; equal for ``tta="none"``)."""
    weights = eval_weights(state)
    model = nnx.merge(graph_eval, weights["params"], weights["batch_stats"], state.consts)
    return tta_logits(lambda x: model(input_fn(x)), to_float(images), tta)


def make_eval_step(graph_eval: nnx.GraphDef[Any],
                   input_fn: Callable[[jax.Array], jax.Array] | None = None,
                   tta: str = "none") -> Callable[[TrainState, Batch], Metrics]:
    """The (unjitted) eval step: masked sums of loss and correct predictions (with ``tta``, of the
    averaged logits; ``correct_plain`` counts those of the plain forward pass)."""
    input_fn = input_fn or (lambda x: x)

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        TRACES["eval_step"] += 1
        logits, plain = eval_logits_tta(graph_eval, state, batch["image"], input_fn, tta)
        mask, labels = batch["mask"], batch["label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = lambda z: jnp.sum((jnp.argmax(z, -1) == labels).astype(jnp.float32) * mask)  # noqa: E731
        out = {"loss_sum": jnp.sum(loss * mask), "correct": correct(logits), "count": jnp.sum(mask)}
        if tta != "none":
            out["correct_plain"] = correct(plain)
        return out

    return eval_step


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def jit_steps(train_step: Callable[..., Any], eval_step: Callable[..., Any], mesh: Mesh) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jit both steps for ``mesh``: state replicated and donated, every batch entry sharded on axis 0."""
    rep, bat = replicated(mesh), batch_sharded(mesh)
    train = jax.jit(train_step, in_shardings=(rep, bat), out_shardings=(rep, rep), donate_argnums=0)
    evaluate = jax.jit(eval_step, in_shardings=(rep, bat), out_shardings=rep)
    return train, evaluate
