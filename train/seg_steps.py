"""Pure train and eval steps of the segmentation task (``--task shapes-seg``).

The same contract as :mod:`train.steps` (state donated, skipped non-finite
steps, EMA, ``fold_in(seed_key, step)`` randomness, one trace a run), with
per-pixel labels:

* augmentation moves image and label map together: a random crop from the
  zero-padded image whose padding is labelled :data:`IGNORE_INDEX`, and a
  horizontal flip;
* loss: softmax cross-entropy averaged over the pixels whose label is not the
  ignore index (``torch.nn.CrossEntropyLoss(ignore_index=255)``, as torchvision's
  segmentation reference trains), with optional label smoothing;
* eval: masked loss / correct-pixel sums and the ``(n, n)`` confusion matrix of
  the batch (:func:`train.seg_metrics.confusion_matrix_jax`), summed on the host
  into the test set's matrix, from which mIoU and pixel accuracy follow exactly as
  torchvision computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train.augment import to_float
from train.seg_data import IGNORE_INDEX
from train.seg_metrics import confusion_matrix_jax
from train.steps import (
    TRACES,
    Batch,
    Metrics,
    TrainState,
    applied_updates,
    apply_update,
    eval_logits,
    reseed,
)


def augment_pair(images: jax.Array, labels: jax.Array, key: jax.Array, *, padding: int,
                 flip: bool) -> tuple[jax.Array, jax.Array]:
    """Crop + flip uint8 images ``(N, H, W, C)`` and labels ``(N, H, W)`` alike; float32 images out."""
    n, h, w, _ = images.shape
    k_crop, k_flip = jax.random.split(key)
    if padding:
        pad = ((0, 0), (padding, padding), (padding, padding))
        img = jnp.pad(images, (*pad, (0, 0)))
        lab = jnp.pad(labels, pad, constant_values=IGNORE_INDEX)  # padding is no class: not scored
        offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * padding + 1)
        crop = lambda a, o: jax.lax.dynamic_slice(a, (o[0], o[1]) + (0,) * (a.ndim - 2), (h, w, *a.shape[2:]))  # noqa: E731
        images, labels = jax.vmap(crop)(img, offsets), jax.vmap(crop)(lab, offsets)
    if flip:
        f = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1))
        images = jnp.where(f[..., None], images[:, :, ::-1, :], images)
        labels = jnp.where(f, labels[:, :, ::-1], labels)
    return to_float(images), labels


def pixel_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
               label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(sum of per-pixel cross-entropies over valid pixels, number of valid pixels)."""
    valid = labels.astype(jnp.int32) != IGNORE_INDEX
    safe = jnp.where(valid, labels.astype(jnp.int32), 0)
    targets = optax.smooth_labels(jax.nn.one_hot(safe, num_classes), label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid).astype(jnp.float32)


def make_train_step(graph_train: nnx.GraphDef[Any], tx: optax.GradientTransformation,
                    lr_schedule: Callable[[Any], Any], *, num_classes: int, label_smoothing: float,
                    crop_padding: int, flip: bool, ema_decay: float,
                    input_fn: Callable[[jax.Array], jax.Array] | None = None,
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The (unjitted) pure segmentation train step; arguments as :func:`train.steps.make_train_step`."""
    input_fn = input_fn or (lambda x: x)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        TRACES["train_step"] += 1
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        images, labels = augment_pair(batch["image"], batch["label"], key, padding=crop_padding, flip=flip)
        images = input_fn(images)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            model = nnx.merge(graph_train, params, state.batch_stats, state.consts)
            reseed(model, key)
            logits = model(images)
            total, count = pixel_loss(logits, labels, num_classes, label_smoothing)
            return total / jnp.maximum(count, 1.0), (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new, finite = apply_update(state, tx, loss, grads, stats, ema_decay)
        valid = labels.astype(jnp.int32) != IGNORE_INDEX
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid) / jnp.maximum(jnp.sum(valid), 1)
        metrics = {
            "loss": loss, "accuracy": correct, "finite": finite.astype(jnp.int32),
            "grad_norm": optax.tree.norm(grads),
            "lr": jnp.asarray(lr_schedule(applied_updates(state)), jnp.float32),
        }
        return new, metrics

    return train_step


def make_eval_step(graph_eval: nnx.GraphDef[Any], num_classes: int,
                   input_fn: Callable[[jax.Array], jax.Array] | None = None) -> Callable[[TrainState, Batch], Metrics]:
    """The (unjitted) eval step: sums over valid pixels of real examples, and their confusion matrix."""
    input_fn = input_fn or (lambda x: x)

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        TRACES["eval_step"] += 1
        logits = eval_logits(graph_eval, state, batch["image"], input_fn)
        # Padding examples of the last batch (mask 0) count as ignored pixels.
        labels = jnp.where(batch["mask"][:, None, None] > 0, batch["label"].astype(jnp.int32), IGNORE_INDEX)
        loss_sum, count = pixel_loss(logits, labels, num_classes)
        preds = jnp.argmax(logits, -1)
        correct = jnp.sum((preds == labels) & (labels != IGNORE_INDEX)).astype(jnp.float32)
        return {"loss_sum": loss_sum, "correct": correct, "count": count,
                "confusion": confusion_matrix_jax(labels, preds, num_classes)}

    return eval_step


def predict(graph_eval: nnx.GraphDef[Any], state: TrainState, images: jax.Array,
            input_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Class indices ``(N, H, W)`` of uint8 images, with the weights :func:`make_eval_step` uses."""
    return jnp.argmax(eval_logits(graph_eval, state, images, input_fn or (lambda x: x)), -1)
