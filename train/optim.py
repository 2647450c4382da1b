"""Optimizers and schedules (optax): SGD-Nesterov / AdamW, warmup+cosine / one-cycle / plateau decay.

The update of every trainable parameter is

    clip(grad) -> momentum or Adam moments -> + weight_decay * param (kernels only) -> * -lr(step)

i.e. *decoupled* weight decay (SGDW / AdamW, Loshchilov & Hutter): the decay
bypasses the momentum buffers and is scaled by the schedule. Norm scales and
biases (every parameter with ndim <= 1) are never decayed. ``--freeze``
patterns and ``--head-lr`` are applied with ``optax.multi_transform`` over
per-parameter labels ``frozen`` / ``head`` / ``body``; frozen parameters get
zero updates and keep no optimizer state.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from train.config import ConfigError, OptimConfig

Schedule = Callable[[Any], Any]


def path_str(path: tuple[Any, ...]) -> str:
    """``blocks.0.depthwise.kernel`` from a JAX key path."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(parts)


def param_paths(params: Any) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _matcher(pattern: str) -> Callable[[str], bool]:
    try:
        rx = re.compile(pattern)
    except re.error:
        rx = None
    return lambda p: fnmatch.fnmatchcase(p, pattern) or (rx is not None and rx.search(p) is not None)


def frozen_paths(params: Any, patterns: Sequence[str]) -> set[str]:
    """Paths matched by any pattern (glob on the whole path, or regex search); unmatched patterns raise."""
    paths = param_paths(params)
    frozen: set[str] = set()
    for pattern in patterns:
        hit = {p for p in paths if _matcher(pattern)(p)}
        if not hit:
            example = ", ".join(paths[:2] + paths[-1:])
            raise ConfigError(f"--freeze {pattern!r} matches no parameter (paths look like {example})")
        frozen |= hit
    return frozen


def labels(params: Any, cfg: OptimConfig, head: Sequence[str] = ("head.",)) -> Any:
    """Per-parameter label tree: ``frozen``, ``head`` (paths starting with a ``head`` prefix; own LR
    when ``--head-lr`` is set) or ``body``."""
    frozen = frozen_paths(params, cfg.freeze)

    def label(path: tuple[Any, ...], _: Any) -> str:
        p = path_str(path)
        if p in frozen:
            return "frozen"
        return "head" if p.startswith(tuple(head)) and cfg.head_lr >= 0 else "body"

    return jax.tree_util.tree_map_with_path(label, params)


def schedule(cfg: OptimConfig, peak: float, steps_per_epoch: int) -> Schedule:
    """Learning rate as a function of the optimizer step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule in ("constant", "plateau"):  # plateau's decays scale the updates (:func:`with_lr_factor`)
        return optax.constant_schedule(peak)
    if cfg.schedule == "cosine":
        # Starts at 0 (not peak/25): the first steps on fresh BN statistics are the fragile ones.
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), total, end_value=0.0)
    # One-cycle, linear both ways (airbench/fast.ai): peak/10 -> peak over warmup, -> 0 at the end.
    return optax.join_schedules(
        [optax.linear_schedule(peak / 10, peak, max(warmup, 1)),
         optax.linear_schedule(peak, 0.0, max(total - warmup, 1))],
        [max(warmup, 1)],
    )


def _base(cfg: OptimConfig, lr: Schedule) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    if cfg.optimizer == "sgd":
        moments = optax.trace(decay=cfg.momentum, nesterov=True)
    else:
        moments = optax.scale_by_adam(b1=cfg.momentum, b2=cfg.beta2)
    parts = [moments]
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def make_optimizer(cfg: OptimConfig, params: Any, steps_per_epoch: int, head: Sequence[str] = ("head.",)
                   ) -> tuple[optax.GradientTransformation, Schedule]:
    """The full update rule for ``params`` and the body learning-rate schedule (for logging);
    ``head``: path prefixes of the classifier (``--head-lr``)."""
    body_lr = schedule(cfg, cfg.lr, steps_per_epoch)
    tree_labels = labels(params, cfg, head)
    used = set(jax.tree_util.tree_leaves(tree_labels))
    if used == {"frozen"}:
        raise ConfigError("--freeze matches every parameter; nothing left to train")
    transforms: dict[str, optax.GradientTransformation] = {
        "frozen": optax.set_to_zero(),
        "body": _base(cfg, body_lr),
        "head": _base(cfg, schedule(cfg, cfg.head_lr, steps_per_epoch)) if cfg.head_lr >= 0 else optax.set_to_zero(),
    }
    parts = []
    if cfg.grad_clip > 0:
        # Zero frozen gradients first so they do not count in the global norm.
        keep = {"frozen": optax.set_to_zero(), "body": optax.identity(), "head": optax.identity()}
        parts += [optax.multi_transform(keep, tree_labels), optax.clip_by_global_norm(cfg.grad_clip)]
    parts.append(optax.multi_transform(transforms, tree_labels))
    if cfg.schedule == "plateau":
        # Last in the chain, so its state is opt_state[-1]: a factor the host lowers between epochs, saved
        # with the optimizer state (an exact resume needs no other record of the decays).
        parts.append(optax.inject_hyperparams(optax.scale)(step_size=1.0))
    return optax.chain(*parts), body_lr


# locuslab/TCN music_test.py: from epoch 11 on, an epoch whose validation loss exceeds the largest of the
# previous 3 divides the learning rate by 10 (again each time it happens).
PLATEAU_AFTER, PLATEAU_WINDOW, PLATEAU_FACTOR = 10, 3, 0.1


def plateau_decays(valid_losses: Sequence[float]) -> bool:
    """Whether the ``plateau`` rule lowers the learning rate after the newest of ``valid_losses``
    (one per epoch, oldest first)."""
    if len(valid_losses) <= max(PLATEAU_AFTER, PLATEAU_WINDOW):
        return False
    return valid_losses[-1] > max(valid_losses[-1 - PLATEAU_WINDOW:-1])


def lr_factor(opt_state: Any) -> float:
    """The ``plateau`` schedule's current multiplier of the learning rate (1.0 before any decay)."""
    return float(opt_state[-1].hyperparams["step_size"])


def with_lr_factor(opt_state: Any, factor: float) -> Any:
    """``opt_state`` of a ``plateau`` optimizer with its learning-rate multiplier set to ``factor``."""
    last = opt_state[-1]
    size = last.hyperparams["step_size"]
    hyper = {**last.hyperparams, "step_size": jnp.asarray(factor, size.dtype)}
    return (*opt_state[:-1], last._replace(hyperparams=hyper))
