"""The training loop: resume, steps, evaluation, checkpoints, signals, outputs.

Resume: the newest checkpoint in ``workdir/checkpoints`` is restored (state,
step, running sums of the current epoch); step ``k`` always uses batch
``epoch_order(seed, epoch)[pos]`` and key ``fold_in(key, k - 1)``, so an
interrupted run rerun with the same command ends bit-identical to an
uninterrupted one (on CPU). SIGTERM/SIGINT: the step in flight finishes, its
state is checkpointed, exit 0 (SIGTERM) / 130 (SIGINT). Non-finite steps are
skipped inside the jitted step (see :mod:`train.steps`); ``--max-bad-steps``
in a row stop the run with :class:`TrainingError`, and no checkpoint is
written during such a streak, so the last one on disk predates it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import numpy as np
from flax import nnx

from train import (
    distributed,
    faults,
    feed,
    malloc,
    resize,
    seg_metrics,
    seg_steps,
    steps,
    whiten,
    workdir,
    zoo_model,
)
from train.checkpointing import Checkpointer, RestoreError
from train.config import SEQ_TASKS, Config, ConfigError, default_data_dir, validate
from train.data import load_or_download
from train.feed import Split, epoch_order, fits_on_device, make_mesh
from train.model import describe as model_describe
from train.model import initial_model
from train.optim import make_optimizer


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. persistent non-finite loss); reported as one line."""


@dataclass
class _Signals:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the next step boundary."""

    received: int | None = None
    previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _task_metric(task: str, result: dict[str, Any]) -> dict[str, Any]:
    """``metric`` (its name) and ``test_metric`` (its value) of summary.json, and the task's extras."""
    if task == "shapes-seg":
        return {"metric": "mIoU", "test_metric": result["test_miou"], "test_miou": result["test_miou"],
                "test_iou": result["test_iou"], "pixel_accuracy": result["test_accuracy"]}
    return {"metric": "accuracy", "test_metric": result["test_accuracy"]}


def _shapes_seg(cfg: Config, log: Any) -> Any:
    from train import seg_data

    n_train, n_test = cfg.data.train_limit or 2000, cfg.data.test_limit or 500
    log(f"generating shapes-seg: {n_train} train + {n_test} test images of {cfg.data.image_size}px", flush=True)
    return seg_data.load(n_train, n_test, size=cfg.data.image_size)


class Trainer:
    """One run, set up from a :class:`Config` (see :func:`run`)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg = validate(cfg)
        # Absolute: orbax refuses relative checkpoint paths ("Checkpoint path should be absolute").
        self.workdir = Path(cfg.run.workdir).expanduser().absolute()
        self.primary = jax.process_index() == 0
        self.log = print if self.primary else (lambda *a, **k: None)
        workdir.check_config(self.workdir, cfg)
        self.mesh = make_mesh()
        nd = self.mesh.size
        if cfg.optim.batch_size % nd:
            raise ConfigError(f"--batch-size {cfg.optim.batch_size} must be a multiple of the {nd} devices")
        self.eval_bs = -(-cfg.run.eval_batch_size // nd) * nd
        self.seg = cfg.data.task == "shapes-seg"
        if self.seg:
            ds = _shapes_seg(cfg, self.log)
        else:
            ds = load_or_download(cfg.data.data_dir, default_data_dir(), cfg.data.download_url,
                                  cfg.data.download_md5, progress=cfg.run.progress
                                  ).limit(cfg.data.train_limit, cfg.data.test_limit)
        if len(ds.train_labels) < cfg.optim.batch_size:
            raise ConfigError(f"--batch-size {cfg.optim.batch_size} exceeds the {len(ds.train_labels)} training images")
        nbytes = ds.train_images.nbytes + ds.test_images.nbytes
        on_device = {"yes": True, "no": False}.get(cfg.data.data_on_device)
        on_device = fits_on_device(nbytes) if on_device is None else on_device
        self.train_data = Split(ds.train_images, ds.train_labels, self.mesh, on_device=on_device)
        self.test_data = Split(ds.test_images, ds.test_labels, self.mesh, on_device=on_device)
        self.ckpt = Checkpointer(self.workdir / "checkpoints", keep=cfg.run.keep_checkpoints)
        if self.primary:
            workdir.write_text(self.workdir / "config.json", json.dumps(cfg.to_dict(), indent=1))
        self.steps_per_epoch = self.train_data.n // cfg.optim.batch_size
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs

        model, self.init_note = initial_model(cfg.model, cfg.run.seed)
        if cfg.model.stem_init == "whiten":
            n = whiten.whiten_stem(model, ds.train_images)
            self.init_note = f"stem: {n} of {model.stem.conv.out_features} filters patch-whitening"
        # Zoo models take normalised input (upstream convention); DSCNet normalises inside.
        self.input_norm = zoo_model.input_norm(cfg.model, model) if zoo_model.is_zoo(cfg.model) else None
        input_fn = zoo_model.normalizer(*self.input_norm) if self.input_norm else None
        self.graph_train, self.graph_eval, params, stats, consts = steps.split_model(model)
        self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
        self.tx, self.lr_fn = make_optimizer(cfg.optim, params, self.steps_per_epoch,
                                             head=zoo_model.head_prefixes(cfg.model))
        self.state = steps.create_state(params, stats, consts, self.tx, self.mesh, seed=cfg.run.seed,
                                        ema=cfg.optim.ema_decay > 0)
        self.input_fn = input_fn
        task_steps = seg_steps if self.seg else steps

        def make_train_fn(**sized: int) -> Any:
            fn = task_steps.make_train_step(
                self.graph_train, self.tx, self.lr_fn, num_classes=cfg.model.num_classes,
                label_smoothing=cfg.optim.label_smoothing, crop_padding=cfg.data.crop_padding, flip=cfg.data.flip,
                ema_decay=cfg.optim.ema_decay, input_fn=input_fn, **sized,
                **({} if self.seg else {"cutout": cfg.data.cutout}))
            return faults.wrap_train_step(fn)  # itself unless a nan fault is requested

        eval_fn = (seg_steps.make_eval_step(self.graph_eval, cfg.model.num_classes, input_fn) if self.seg
                   else steps.make_eval_step(self.graph_eval, input_fn, cfg.run.tta))
        self.train_step, self.eval_step = steps.jit_steps(make_train_fn(), eval_fn, self.mesh)
        # Progressive resizing: one compiled step per smaller (or larger) size; the data's own size
        # is the plain step.
        native = ds.train_images.shape[1]
        self.sized_steps = {size: steps.jit_steps(make_train_fn(image_size=size), eval_fn, self.mesh)[0]
                            for size in set(cfg.data.train_sizes) - {native}}
        self.meta: dict[str, Any] = {"train_seconds": 0.0, "epoch_sums": [0.0, 0.0, 0], "data_order": feed.ORDER}
        self.traces_at_start = steps.TRACES["train_step"]
        self.records: list[dict[str, Any]] = []
        self.image_shape = tuple(ds.train_images.shape[1:])

    # ------------------------------------------------------------ pieces
    def resume(self) -> bool:
        restored = self.ckpt.restore_latest(self.state)
        step = 0
        if restored is not None:
            self.state, meta = restored
            # Checkpoints from before the order was recorded used NumPy's Generator stream.
            order = meta.get("data_order", "numpy-generator")
            if order != feed.ORDER:
                raise RestoreError(f"{self.ckpt.dir}: this run was trained with data order {order!r}; this trainer "
                                   f"uses {feed.ORDER!r}, so a resume would not see the same batches. Finish it with "
                                   "the trainer version that started it, or start over in a new --workdir")
            self.meta.update(meta)
            step = int(meta["step"])
        if self.primary:
            self.records = workdir.truncate_metrics(self.workdir / "metrics.jsonl", step)
        return restored is not None

    def evaluate(self, signals: _Signals | None = None) -> dict[str, Any] | None:
        """``test_loss``, ``test_accuracy`` (per pixel for segmentation) and, for segmentation,
        ``test_miou`` and per-class ``test_iou``; None when a signal arrives first (SIGTERM must
        not wait for it)."""
        sums = np.zeros(4)
        confusion = seg_metrics.ConfusionMatrix(self.cfg.model.num_classes) if self.seg else None
        t0 = time.perf_counter()
        for batch in self.test_data.eval_batches(self.eval_bs):
            if signals is not None and signals.received is not None:
                return None
            out = self.eval_step(self.state, batch)
            out = steps.to_host(out)
            sums += np.array([float(out["loss_sum"]), float(out["correct"]), float(out["count"]),
                              float(out.get("correct_plain", 0.0))])
            if confusion is not None:
                confusion.add(out["confusion"])
        # Images per second of the whole pass (the first pass of a process includes compiling).
        result: dict[str, Any] = {"test_loss": sums[0] / sums[2], "test_accuracy": sums[1] / sums[2],
                                  "eval_images_per_second": self.test_data.n / (time.perf_counter() - t0)}
        if self.cfg.run.tta != "none" and not self.seg:
            result["test_accuracy_no_tta"] = sums[3] / sums[2]
        if confusion is not None:
            m = seg_metrics.metrics(confusion.mat)
            result.update(test_miou=m["mean_iou"], test_iou=m["iou"])
        return result

    def save(self) -> None:
        self.ckpt.save(self.state, {**self.meta, "epoch": int(steps.to_host(self.state.step)) / self.steps_per_epoch})
        self.meta.pop("eval_due", None)

    def final_model(self) -> nnx.Module:
        w = steps.eval_weights(self.state)
        host = steps.to_host((w["params"], w["batch_stats"], self.state.consts))
        return nnx.merge(self.graph_eval, *host)

    # ------------------------------------------------------------ the loop
    def train(self, signals: _Signals) -> int:
        cfg, spe = self.cfg, self.steps_per_epoch
        bs = cfg.optim.batch_size
        step = int(steps.to_host(self.state.step))
        loss_sum, acc_sum, n_sum = self.meta["epoch_sums"]
        # A streak of skipped steps that a signal interrupted goes on counting after the resume.
        bad_first, bad_count = self.meta.pop("bad_streak", [0, 0])
        pending: tuple[int, Any] | None = None
        order, order_epoch = None, -1
        bar = None
        t_last = time.perf_counter()
        fast_images, fast_seconds = 0, 0.0  # steady-state throughput (first step of a process = compile)
        first = True
        due = self.meta.pop("eval_due", None)
        if due is not None:  # an end-of-epoch evaluation a signal interrupted before the checkpoint
            self._end_epoch(*due, signals=signals)

        def drain() -> None:
            nonlocal pending, loss_sum, acc_sum, n_sum, bad_first, bad_count
            if pending is None:
                return
            k, m = pending
            pending = None
            m = steps.to_host(m)
            if int(m["finite"]):
                loss_sum, acc_sum, n_sum = loss_sum + float(m["loss"]), acc_sum + float(m["accuracy"]), n_sum + 1
                bad_count = 0
            else:
                bad_first, bad_count = (k if bad_count == 0 else bad_first), bad_count + 1
                self.log(f"warning: step {k}: non-finite loss or gradients, step skipped", file=sys.stderr)
                if bad_count >= cfg.run.max_bad_steps:
                    last = self.ckpt.steps()
                    raise TrainingError(
                        f"non-finite loss at steps {bad_first}-{k} ({bad_count} in a row); stopped. Last checkpoint: "
                        + (f"step {last[-1]} in {self.ckpt.dir}" if last else "none"))

        while step < self.total_steps:
            if signals.received is not None:
                break
            epoch, pos = divmod(step, spe)
            if order_epoch != epoch:
                order, order_epoch = epoch_order(cfg.run.seed, epoch, self.train_data.n), epoch
                if bar is not None:
                    bar.close()
                bar = self._bar(epoch, pos)
            batch = self.train_data.batch(order[pos * bs:(pos + 1) * bs])
            if faults.injects_nan():
                batch["poison"] = self.train_data.put(np.full(bs, faults.poison(step + 1), np.float32))
            self.state, metrics = self._step_fn(step)(self.state, batch)
            drain()  # the previous step's metrics, while this one runs
            pending, step = (step + 1, metrics), step + 1
            faults.after_step(step)
            now = time.perf_counter()
            self.meta["train_seconds"] += now - t_last
            if not first:
                fast_images, fast_seconds = fast_images + bs, fast_seconds + (now - t_last)
            t_last, first = now, False
            if bar is not None:
                bar.update(1)
                if n_sum:
                    ips = fast_images / fast_seconds if fast_seconds else 0.0
                    bar.set_postfix(loss=f"{loss_sum / n_sum:.3f}", acc=f"{acc_sum / n_sum:.3f}", img_s=f"{ips:.0f}",
                                    refresh=False)
            end_of_epoch = step % spe == 0
            periodic = cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0
            if end_of_epoch or periodic or signals.received is not None:
                drain()
                # Waiting here for this step to finish is training time too (else each epoch lost one step).
                waited = time.perf_counter() - now
                self.meta["train_seconds"] += waited
                if fast_images:
                    fast_seconds += waited
                self.meta["epoch_sums"] = [loss_sum, acc_sum, n_sum]
            if end_of_epoch:
                if bar is not None:
                    bar.close()
                    bar = None
                ips = fast_images / fast_seconds if fast_seconds else 0.0
                self.meta["images_per_second"] = ips or self.meta.get("images_per_second", 0.0)
                self._end_epoch(epoch, step, loss_sum, acc_sum, n_sum, ips, signals=signals)
                loss_sum, acc_sum, n_sum = 0.0, 0.0, 0
                self.meta["epoch_sums"] = [0.0, 0.0, 0]
            if (end_of_epoch or periodic) and bad_count == 0:
                self.save()
            t_last = time.perf_counter()  # eval and checkpoint time is not training time
        drain()
        if bar is not None:
            bar.close()
        self.meta["images_per_second"] = fast_images / fast_seconds if fast_seconds else self.meta.get("images_per_second", 0.0)
        if signals.received is not None:
            self.meta["epoch_sums"] = [loss_sum, acc_sum, n_sum]
            self.meta["bad_streak"] = [bad_first, bad_count]
            if step > 0:  # nothing completed yet: nothing to save
                self.save()
            self.log(f"signal {signals.received}: saved step {step} in {self.ckpt.dir}; rerun the same command to resume",
                     file=sys.stderr)
            return _signal_exit(signals)
        return -1

    def _step_fn(self, step: int) -> Any:
        """The compiled train step for step ``step`` (0-based): the one of its ``--train-sizes`` phase."""
        sizes = self.cfg.data.train_sizes
        if not sizes:
            return self.train_step
        return self.sized_steps.get(resize.size_at(sizes, step, self.total_steps), self.train_step)

    def _bar(self, epoch: int, pos: int) -> Any:
        if not (self.cfg.run.progress and self.primary):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=pos, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}",
                    leave=False, dynamic_ncols=True, mininterval=0.5)

    def _end_epoch(self, epoch: int, step: int, loss_sum: float, acc_sum: float, n_sum: int, ips: float, *,
                   signals: _Signals) -> None:
        last = step == self.total_steps
        if (epoch + 1) % self.cfg.run.eval_every and not last:
            return
        result = self.evaluate(signals)
        if result is None:  # interrupted: the checkpoint remembers to evaluate first on resume
            self.meta["eval_due"] = [epoch, step, loss_sum, acc_sum, n_sum, ips]
            return
        test_loss, test_acc = result["test_loss"], result["test_accuracy"]
        rec = {
            "epoch": epoch + 1, "step": step,
            "train_loss": loss_sum / n_sum if n_sum else None,
            "train_accuracy": acc_sum / n_sum if n_sum else None,
            "test_loss": test_loss, "test_accuracy": test_acc,
            **({"test_miou": result["test_miou"]} if self.seg else {}),
            **{k: result[k] for k in ("test_accuracy_no_tta",) if k in result},
            "lr": self._last_lr(), "train_seconds": round(self.meta["train_seconds"], 3),
            "images_per_second": round(ips, 1), "skipped_steps": int(steps.to_host(self.state.skipped)),
        }
        self.records.append(rec)
        if self.primary:
            workdir.append_jsonl(self.workdir / "metrics.jsonl", rec)
        tl = "  n/a" if rec["train_loss"] is None else f"{rec['train_loss']:.4f}"
        ta = "  n/a" if rec["train_accuracy"] is None else f"{rec['train_accuracy']:.4f}"
        miou = f" mIoU {result['test_miou']:.4f}" if self.seg else ""
        self.log(f"epoch {epoch + 1:3d}/{self.cfg.optim.epochs}  train loss {tl} acc {ta}  "
                 f"test loss {test_loss:.4f} acc {test_acc:.4f}{miou}  {ips:7.0f} img/s  "
                 f"{self.meta['train_seconds']:7.1f}s", flush=True)

    def _last_lr(self) -> float:
        """The learning rate of the last update applied (skipped steps do not advance the schedule)."""
        applied = int(steps.to_host(steps.applied_updates(self.state)))
        return float(self.lr_fn(max(applied - 1, 0)))

    def finish(self, signals: _Signals) -> dict[str, Any] | None:
        """Final evaluation, export, summary.json, curves.png; None when a signal interrupts it."""
        cfg = self.cfg
        result = self.evaluate(signals)
        if result is None:
            return None
        test_loss, test_acc = result["test_loss"], result["test_accuracy"]
        if cfg.run.export_torch and self.primary:
            zoo_model.export(self.final_model(), cfg.run.export_torch, self.input_norm)
            self.log(f"exported {cfg.run.export_torch}")
        step = int(steps.to_host(self.state.step))
        summary = {
            "test_accuracy": test_acc, "test_loss": test_loss,
            "best_test_accuracy": max([r["test_accuracy"] for r in self.records] + [test_acc]),
            "epochs": step / self.steps_per_epoch, "steps": step,
            "train_seconds": round(self.meta["train_seconds"], 3),
            "images_per_second": round(self.meta.get("images_per_second", 0.0), 1),
            "eval_images_per_second": round(result["eval_images_per_second"], 1),
            "params": self.num_params, "devices": self.mesh.size, "batch_size": cfg.optim.batch_size,
            "skipped_steps": int(steps.to_host(self.state.skipped)),
            **{f"time_to_{p}": workdir.time_to(self.records, p / 100) for p in (80, 85, 90, 91)},
            "tta": cfg.run.tta, **{k: result[k] for k in ("test_accuracy_no_tta",) if k in result},
            "train_step_traces": steps.TRACES["train_step"] - self.traces_at_start,
            "model": zoo_model.describe(cfg.model) if zoo_model.is_zoo(cfg.model)
            else model_describe(cfg.model),
            "loadavg": [round(v, 2) for v in os.getloadavg()],  # 1/5/15 min at the end: was the CPU shared?
            "malloc": malloc.status,  # per option: set, or why not
            "peak_rss_mib": workdir.peak_rss_mib(),
            "task": cfg.data.task, "macs": self.macs(),
            **_task_metric(cfg.data.task, result),
        }
        if self.input_norm:
            summary["input_mean"], summary["input_std"] = map(list, self.input_norm)
        if self.primary:
            workdir.write_text(self.workdir / "summary.json", json.dumps(summary, indent=1))
            if cfg.run.plot and self.records:
                from train.plots import plot_curves

                plot_curves(self.records, self.workdir / "curves.png")
            if cfg.run.plot and self.seg:
                self.plot_predictions(self.workdir / "predictions.png")
        return summary

    def macs(self) -> int:
        """Multiply-adds per example of the model (:func:`jaxdsc.summary`, exact formulas)."""
        from jaxdsc.summary import summary

        return int(summary(self.final_model(), (1, *self.image_shape)).total_macs)

    def plot_predictions(self, path: Path, n: int = 4) -> Path:
        """A PNG of the first ``n`` test images: image, ground truth, prediction."""
        from train.seg_data import CLASSES
        from train.seg_plots import plot_segmentation

        images, labels = self.test_data.host_images[:n], self.test_data.host_labels[:n]
        predict = jax.jit(lambda state, x: seg_steps.predict(self.graph_eval, state, x, self.input_fn))
        preds = np.asarray(predict(steps.to_host(self.state), images))
        return plot_segmentation(images, labels, preds, path, self.cfg.model.num_classes, CLASSES)


def run(cfg: Config) -> int:
    """Train (or resume, or evaluate) as configured; returns the process exit code.

    SIGTERM/SIGINT are caught from the start: during setup they stop the run before its first
    step, during training after the step in flight (saved), during the final evaluation /
    export (the final checkpoint is already saved; a rerun redoes them).
    """
    signals = _Signals()
    signals.install()
    try:
        return _run(cfg, signals)
    finally:
        signals.restore()


def _signal_exit(signals: _Signals) -> int:
    return 0 if signals.received == signal.SIGTERM else 130


def _run(cfg: Config, signals: _Signals) -> int:
    distributed.maybe_initialize(cfg.run)  # before anything starts a JAX backend
    if cfg.run.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(cfg.run.compile_cache).expanduser()))
    if cfg.data.task in SEQ_TASKS:  # the TCN paper's sequence tasks have their own loop
        from train.seq_loop import run_sequence

        return run_sequence(cfg, signals)
    trainer = Trainer(cfg)
    if trainer.init_note:
        trainer.log(trainer.init_note)
    resumed = trainer.resume()
    step = int(steps.to_host(trainer.state.step))
    if cfg.run.eval_only:
        if not resumed and not cfg.model.init_from:
            raise ConfigError(f"--eval-only needs a checkpoint in {trainer.workdir} or --init-from")
        result = trainer.evaluate() or {"test_loss": math.nan, "test_accuracy": math.nan}
        test_loss, test_acc = result["test_loss"], result["test_accuracy"]
        miou = f" mIoU {result['test_miou']:.4f}" if trainer.seg else ""
        trainer.log(f"eval: test loss {test_loss:.4f} acc {test_acc:.4f}{miou} ({trainer.test_data.n} images, "
                    f"step {step})")
        if trainer.primary:
            workdir.write_text(trainer.workdir / "eval.json", json.dumps(
                {**result, "task": cfg.data.task, **_task_metric(cfg.data.task, result), "tta": cfg.run.tta, "step": step,
                 "images": trainer.test_data.n}))
        if cfg.run.export_torch and trainer.primary:
            zoo_model.export(trainer.final_model(), cfg.run.export_torch, trainer.input_norm)
        return 0
    trainer.log(f"{'resuming at step ' + str(step) if resumed else 'training'}: {trainer.total_steps} steps "
                f"({cfg.optim.epochs} epochs x {trainer.steps_per_epoch}), {trainer.num_params} params, "
                f"{trainer.mesh.size} device(s), workdir {trainer.workdir}", flush=True)
    code = trainer.train(signals)
    if code >= 0:
        return code
    trainer.save()
    summary = trainer.finish(signals)
    if summary is None:
        trainer.log(f"signal {signals.received}: stopped before the final evaluation; the final checkpoint is "
                    "saved, rerun the same command to finish", file=sys.stderr)
        return _signal_exit(signals)
    trainer.log(f"done: test accuracy {summary['test_accuracy']:.4f} after {summary['steps']} steps, "
                f"{summary['train_seconds']:.1f}s, {summary['images_per_second']:.0f} img/s", flush=True)
    return 0
