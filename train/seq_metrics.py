"""Losses and metrics of the TCN paper's sequence tasks (pure ``jnp`` functions, jit-able).

* adding: mean squared error of the prediction at the last step
  (``F.mse_loss`` in locuslab/TCN); the constant predictor 1 scores
  ``Var(U + U') = 1/6`` (0.167) in expectation.
* copy: cross-entropy over all ``T + 20`` positions, averaged
  (``nn.CrossEntropyLoss`` on the flattened outputs).
* music: negative log-likelihood per time step, summed over the 88 keys, of
  independent Bernoulli keys with ``sigmoid`` probabilities; the split's NLL
  is the total over all predicted steps of all sequences divided by their
  number (locuslab/TCN ``music_test.py``: ``-trace(y log p^T + (1-y) log(1-p)^T)``
  summed, then ``/ count``). Computed from logits in the stable form
  ``softplus(z) - y z`` (the same value where ``log(sigmoid)`` is finite).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METRICS = {"adding": "mse", "copy": "cross_entropy", "music-jsb": "nll", "music-nottingham": "nll"}
"""Task -> name of its metric (lower is better for all)."""


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all elements."""
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits`` ``(..., K)`` against int ``labels`` ``(...)``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1))


def bernoulli_nll_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed NLL over keys and masked steps, number of masked steps).

    ``logits``/``targets``: ``(B, L, 88)``; ``mask``: ``(B, L)``, 1 on real steps.
    Divide the totals of a whole split to get the paper's per-step NLL.
    """
    z = logits.astype(jnp.float32)
    per_key = jax.nn.softplus(z) - targets.astype(jnp.float32) * z  # -[y log p + (1-y) log(1-p)]
    per_step = jnp.sum(per_key, axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(per_step * m), jnp.sum(m)


def music_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """NLL per time step (summed over keys) of one batch: the loss the music tasks train on."""
    total, count = bernoulli_nll_sum(logits, targets, mask)
    return total / jnp.maximum(count, 1.0)
