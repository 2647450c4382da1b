"""Training on the TCN paper's sequence tasks: ``python -m train --task adding|copy|music-jsb|music-nottingham``.

The same workdir contract as the CIFAR-10 loop (:mod:`train.loop`):
``config.json``, checkpoints (:class:`train.checkpointing.Checkpointer`, one
per epoch; rerunning the command resumes from the newest), ``metrics.jsonl``
(one record per epoch), ``summary.json``, ``curves.png``, ``--export-torch``
and SIGTERM/SIGINT handling at step boundaries. Model: :class:`jaxdsc.models.TCN`.

* adding: prediction = output at the last step (:meth:`jaxdsc.models.TCN.last`: the
  same function as the full forward's last step, about 1/4 of its work); loss and metric MSE.
* copy: logits at every step; loss and metric cross-entropy over all positions.
* music: sigmoid outputs; loss and metric NLL per time step summed over the 88
  keys (:mod:`train.seq_metrics`); batches of whole sequences padded with a
  mask to one of a few lengths (32, 48, 72, ... growing by sqrt(2)). The reported ``test_metric`` is the test
  NLL at the epoch with the best validation NLL, as the paper reports it.

With ``--ema-decay`` the run keeps an exponential moving average of the weights
(:func:`train.steps.apply_update`, as the CIFAR-10 loop); it is what every
evaluation scores and what ``--export-torch`` writes.

Step ``k`` uses the batch ``epoch_order(seed, epoch)[pos]`` and dropout key
``fold_in(key, k)``, so a resumed run sees the same data and keys.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdsc.models import TCN
from train import malloc, optim, seq_data, seq_metrics, steps
from train.checkpointing import Checkpointer
from train.config import Config, ModelConfig, validate
from train.feed import epoch_order
from train.loop import TrainingError, _signal_exit, _Signals
from train.workdir import append_jsonl, check_config, truncate_metrics, write_text


def _bucket(n: int) -> int:
    """Padded length of a music batch: 32, 48, 72, 104, ... (x sqrt(2), multiples of 8).

    Few compiled shapes (12 up to Nottingham's 1788 steps) for at most ~45% padding.
    """
    b = 32
    while b < n:
        b = math.ceil(b * math.sqrt(2) / 8) * 8
    return b


def task_features(task: str) -> tuple[int, int]:
    """(input, output) features per time step of a sequence task's model."""
    return {"adding": (2, 1), "copy": (1, 10)}.get(task, (seq_data.KEYS, seq_data.KEYS))


def build_tcn(task: str, m: ModelConfig, *, rngs: nnx.Rngs) -> TCN:
    """The TCN a ``--model tcn`` config describes, with ``task``'s input and output widths."""
    fin, fout = task_features(task)
    return TCN(fin, fout, m.channels, kernel_size=m.kernel_size, separable=m.separable, dense_stem=m.dense_stem,
               dropout=m.dropout, gated=m.gated, impl=m.impl, rngs=rngs)


def _outputs(task: str, model: TCN, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """What the task's loss reads: adding, the last step's output ``(N, 1)``; else every step's."""
    return model.last(x, key=key) if task == "adding" else model(x, key=key)


def _loss(task: str, out: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(mean loss of the batch, its weight): the weight makes sums over batches exact."""
    if task == "adding":
        return seq_metrics.mse(out[:, 0], batch["y"]), jnp.float32(batch["y"].shape[0])
    if task == "copy":
        return seq_metrics.cross_entropy(out, batch["y"]), jnp.float32(batch["y"].size)
    total, count = seq_metrics.bernoulli_nll_sum(out, batch["y"], batch["mask"])
    return total / jnp.maximum(count, 1.0), count


class SeqTrainer:
    """One sequence-task run (see :func:`run_sequence`)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg = validate(cfg)
        d, m = cfg.data, cfg.model
        self.task = d.task
        self.workdir = Path(cfg.run.workdir).expanduser().absolute()
        check_config(self.workdir, cfg)
        if self.task in seq_data.MUSIC_FILES:
            music = seq_data.load_music(self.task, d.data_dir)
            self.train_set, self.eval_sets = music.train, {"valid": music.valid, "test": music.test}
            n_train = len(music.train)
        else:
            gen = seq_data.generate(self.task, n_train=d.train_limit or {"adding": 50000}.get(self.task, 10000),
                                    n_test=d.test_limit or 1000, length=d.seq_length or None, seed=cfg.run.seed)
            self.train_set = (gen.train_x, gen.train_y)
            self.eval_sets = {"test": (gen.test_x, gen.test_y)}
            n_train = len(gen.train_y)
        self.n_train = n_train
        self.steps_per_epoch = n_train // cfg.optim.batch_size
        if self.steps_per_epoch < 1:
            from train.config import ConfigError

            raise ConfigError(f"--batch-size {cfg.optim.batch_size} exceeds the {n_train} training sequences")
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_text(self.workdir / "config.json", json.dumps(cfg.to_dict(), indent=1))
        model = build_tcn(self.task, m, rngs=nnx.Rngs(cfg.run.seed))
        self.graph, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
        self.tx, self.lr_fn = optim.make_optimizer(cfg.optim, params, self.steps_per_epoch)
        init = functools.partial(steps.init_state, tx=self.tx, seed=cfg.run.seed, ema=cfg.optim.ema_decay > 0)
        self.state = jax.jit(init)(params, {}, rest)
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step)
        self.ckpt = Checkpointer(self.workdir / "checkpoints", keep=cfg.run.keep_checkpoints)
        self.meta: dict[str, Any] = {"train_seconds": 0.0}
        self.records: list[dict[str, Any]] = []

    # ------------------------------------------------------------ pure steps
    def _model(self, params: Any, consts: Any) -> TCN:
        return nnx.merge(self.graph, params, consts)

    def _train_step(self, state: steps.TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params: Any) -> jax.Array:
            out = _outputs(self.task, self._model(params, state.consts), batch["x"],
                           key if self.cfg.model.dropout > 0 else None)
            return _loss(self.task, out, batch)[0]

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        new, finite = steps.apply_update(state, self.tx, loss, grads, state.batch_stats, self.cfg.optim.ema_decay)
        return new, {"loss": loss, "finite": finite.astype(jnp.int32)}

    def _eval_step(self, state: steps.TrainState, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        model = self._model(steps.eval_weights(state)["params"], state.consts)
        model.eval()
        loss, weight = _loss(self.task, _outputs(self.task, model, batch["x"]), batch)
        return loss * weight, weight

    # ------------------------------------------------------------ data
    def _music_batch(self, seqs: list[np.ndarray]) -> dict[str, np.ndarray]:
        need = max(len(s) for s in seqs) - 1
        x, y, mask = seq_data.pad_batch(seqs, _bucket(need))
        return {"x": x, "y": y, "mask": mask}

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(self.train_set, list):
            return self._music_batch([self.train_set[i] for i in idx])
        return {"x": self.train_set[0][idx], "y": self.train_set[1][idx]}

    def evaluate(self, split: str) -> float:
        data, bs = self.eval_sets[split], self.cfg.run.eval_batch_size
        total, count = 0.0, 0.0
        if isinstance(data, list):
            order = sorted(range(len(data)), key=lambda i: len(data[i]))  # similar lengths share a batch
            bs = max(1, min(bs, self.cfg.optim.batch_size * 4))
            batches = [self._music_batch([data[i] for i in order[j:j + bs]]) for j in range(0, len(data), bs)]
        else:
            batches = [{"x": data[0][j:j + bs], "y": data[1][j:j + bs]} for j in range(0, len(data[1]), bs)]
        for b in batches:
            s, w = self.eval_step(self.state, b)
            total, count = total + float(s), count + float(w)
        return total / count

    # ------------------------------------------------------------ the loop
    def resume(self) -> bool:
        restored = self.ckpt.restore_latest(self.state)
        step = 0
        if restored is not None:
            self.state, meta = restored
            self.meta.update(meta)
            step = int(meta["step"])
        self.records = truncate_metrics(self.workdir / "metrics.jsonl", step)
        return restored is not None

    def train(self, signals: _Signals) -> int:
        cfg, spe, bs = self.cfg, self.steps_per_epoch, self.cfg.optim.batch_size
        step = int(self.state.step)
        losses: list[Any] = []
        seqs, seconds, first = 0, 0.0, True
        t_last = time.perf_counter()
        while step < self.total_steps and signals.received is None:
            epoch, pos = divmod(step, spe)
            order = epoch_order(cfg.run.seed, epoch, self.n_train)
            self.state, metrics = self.train_step(self.state, self.batch(order[pos * bs:(pos + 1) * bs]))
            losses.append(metrics)
            step += 1
            if step % spe == 0 or signals.received is not None:
                jax.block_until_ready(self.state)
            now = time.perf_counter()
            self.meta["train_seconds"] += now - t_last
            if not first:  # the first step of a process compiles
                seqs, seconds = seqs + bs, seconds + now - t_last
            first = False
            if step % spe == 0:
                host = steps.to_host(losses)
                bad = sum(1 for m in host if not int(m["finite"]))
                if bad >= cfg.run.max_bad_steps:
                    raise TrainingError(f"{bad} non-finite steps in epoch {epoch + 1}; stopped")
                train_loss = float(np.mean([float(m["loss"]) for m in host if int(m["finite"])] or [math.nan]))
                losses = []
                self.meta["sequences_per_second"] = seqs / seconds if seconds else 0.0
                self._end_epoch(epoch, step, train_loss)
                self.ckpt.save(self.state, {**self.meta, "epoch": step / spe})
            t_last = time.perf_counter()
            if cfg.run.progress and step % max(1, spe // 10) == 0:
                print(f"\rstep {step}/{self.total_steps}", end="", file=sys.stderr, flush=True)
        if signals.received is not None:
            if step > 0:
                self.ckpt.save(self.state, {**self.meta, "epoch": step / spe})
            print(f"signal {signals.received}: saved step {step}; rerun the same command to resume", file=sys.stderr)
            return _signal_exit(signals)
        return -1

    def _end_epoch(self, epoch: int, step: int, train_loss: float) -> None:
        last = step == self.total_steps
        if (epoch + 1) % self.cfg.run.eval_every and not last:
            return
        rec: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": train_loss}
        if "valid" in self.eval_sets:
            rec["valid_loss"] = self.evaluate("valid")
        rec["test_loss"] = self.evaluate("test")
        if self.cfg.optim.schedule == "plateau":
            rec["lr"] = self.cfg.optim.lr * optim.lr_factor(self.state.opt_state)  # the rate this epoch trained at
        rec.update(train_seconds=round(self.meta["train_seconds"], 3),
                   sequences_per_second=round(self.meta.get("sequences_per_second", 0.0), 2),
                   skipped_steps=int(self.state.skipped))
        self.records.append(rec)
        append_jsonl(self.workdir / "metrics.jsonl", rec)
        valid = f" valid {rec['valid_loss']:.5g}" if "valid_loss" in rec else ""
        print(f"\repoch {epoch + 1:3d}/{self.cfg.optim.epochs}  train {train_loss:.5g}{valid}  test "
              f"{rec['test_loss']:.5g}  {rec['sequences_per_second']:.1f} seq/s  {rec['train_seconds']:.1f}s",
              flush=True)
        if self.cfg.optim.schedule == "plateau" and optim.plateau_decays([r["valid_loss"] for r in self.records]):
            # Set before the epoch's checkpoint is written, so a resumed run continues at the lowered rate.
            factor = optim.lr_factor(self.state.opt_state) * optim.PLATEAU_FACTOR
            self.state = self.state.replace(opt_state=optim.with_lr_factor(self.state.opt_state, factor))
            print(f"\rvalidation loss rose above the last {optim.PLATEAU_WINDOW} epochs': lr -> "
                  f"{self.cfg.optim.lr * factor:.3g}", flush=True)

    def final_model(self) -> TCN:
        model = self._model(*steps.to_host((steps.eval_weights(self.state)["params"], self.state.consts)))
        model.eval()
        return model

    def finish(self) -> dict[str, Any]:
        cfg, m = self.cfg, self.cfg.model
        test = self.evaluate("test")
        best = None
        if "valid" in self.eval_sets and self.records:
            best = min(self.records, key=lambda r: r["valid_loss"])
        if cfg.run.export_torch:
            import torch_bridge

            torch_bridge.save(self.final_model(), cfg.run.export_torch)
            print(f"exported {cfg.run.export_torch}")
        summary = {
            "task": self.task, "metric": seq_metrics.METRICS[self.task],
            "test_metric": best["test_loss"] if best else test, "final_test_metric": test,
            "best_epoch": best["epoch"] if best else None,
            "params": self.num_params, "train_seconds": round(self.meta["train_seconds"], 3),
            "sequences_per_second": round(self.meta.get("sequences_per_second", 0.0), 2),
            "steps": int(self.state.step), "epochs": int(self.state.step) / self.steps_per_epoch,
            "skipped_steps": int(self.state.skipped), "batch_size": cfg.optim.batch_size,
            "model": f"tcn {'separable' if m.separable else 'dense'} k{m.kernel_size} {list(m.channels)}",
            "loadavg": [round(v, 2) for v in os.getloadavg()], "malloc": malloc.status,
        }
        write_text(self.workdir / "summary.json", json.dumps(summary, indent=1))
        if cfg.run.plot and self.records:
            import warnings

            from train.plots import plot_curves

            with warnings.catch_warnings():  # its accuracy panel stays empty here (no legend entries)
                warnings.simplefilter("ignore", UserWarning)
                plot_curves(self.records, self.workdir / "curves.png")
        return summary


def run_sequence(cfg: Config, signals: _Signals) -> int:
    """Train (or resume) a sequence task; returns the process exit code."""
    trainer = SeqTrainer(cfg)
    resumed = trainer.resume()
    step = int(trainer.state.step)
    if cfg.run.eval_only:
        result = {"task": trainer.task, "metric": seq_metrics.METRICS[trainer.task],
                  "test_metric": trainer.evaluate("test"), "step": step}
        print(f"eval: test {result['metric']} {result['test_metric']:.6g} (step {step})")
        write_text(trainer.workdir / "eval.json", json.dumps(result))
        return 0
    print(f"{'resuming at step ' + str(step) if resumed else 'training'} {trainer.task}: {trainer.total_steps} "
          f"steps ({cfg.optim.epochs} epochs x {trainer.steps_per_epoch}), {trainer.num_params} params, "
          f"workdir {trainer.workdir}", flush=True)
    code = trainer.train(signals)
    if code >= 0:
        return code
    summary = trainer.finish()
    print(f"done: {summary['task']} test {summary['metric']} {summary['test_metric']:.6g}, "
          f"{summary['train_seconds']:.1f}s, {summary['sequences_per_second']:.1f} seq/s", flush=True)
    return 0
