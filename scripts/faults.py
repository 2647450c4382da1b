"""Reliability figures: every property of issue 4 at full counts, one line each.

    python scripts/faults.py                                   # full counts (~15 min on 2 busy cores)
    python scripts/faults.py --quick                           # small counts (a few minutes)
    python scripts/faults.py --json scripts/results/faults.json

Each line reads ``property: passed/total`` plus its figures (e.g. the slowest
SIGTERM exit). The exit status is 1 when any property fails (the failing
trials are printed below the table), 0 otherwise. The trials are those of
``tests/test_faults.py`` / ``tests/test_security.py`` (``scripts/_faults_lib.py``, ``scripts/_faults_files.py``),
run on a snapshot of the sources taken at the start, so edits made to the
working tree meanwhile cannot mix two versions of the code into one figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxdsc", "torch_bridge", "train")

FULL = {"kill": 20, "sigterm": 20, "crash": 50, "nan_skip": 5, "nan_stop": 5, "keep_saves": 30, "bitflips": 500,
        "fuzz": 1000, "tb_mismatch": None}
QUICK = {"kill": 2, "sigterm": 2, "crash": 6, "nan_skip": 1, "nan_stop": 1, "keep_saves": 8, "bitflips": 50,
         "fuzz": 60, "tb_mismatch": 6}


def source_digest(root: Path) -> str:
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def snapshot(dest: Path) -> Path:
    """Copy the packages and the trial library to ``dest`` (run from there, not from the live tree)."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "scripts").mkdir(parents=True)
    for name in ("_faults_lib.py", "_faults_files.py"):
        shutil.copy2(ROOT / "scripts" / name, dest / "scripts" / name)
    return dest


class Report:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, trials: list[Any], figure: str = "", **extra: Any) -> dict[str, Any]:
        passed = sum(t.ok for t in trials)
        row = {"property": name, "passed": passed, "total": len(trials), "ok": bool(trials) and passed == len(trials),
               "figure": figure, "failures": [t.detail for t in trials if not t.ok][:10], **extra}
        self.rows.append(row)
        line = f"{name}: {passed}/{len(trials)}" + (f" ({figure})" if figure else "")
        print(line if row["ok"] else f"{line}  FAILED", flush=True)
        return row


def run_parallel(jobs: int, fns: list[Callable[[], Any]]) -> list[Any]:
    from _faults_lib import GATE, Trial

    def guarded(fn: Callable[[], Any]) -> Any:
        with GATE:
            try:
                return fn()
            except Exception as e:  # a trial that crashes is a failed trial, with its reason
                return Trial(False, f"{type(e).__name__}: {str(e)[:300]}")

    if jobs <= 1:
        return [guarded(fn) for fn in fns]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(guarded, fns))


def steps_for(rng: random.Random, n: int, choices: list[int]) -> list[int]:
    """``n`` seeded random steps covering every choice once before repeating."""
    out: list[int] = []
    while len(out) < n:
        block = list(choices)
        rng.shuffle(block)
        out += block
    return out[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a few minutes)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random steps, flips and fuzz")
    parser.add_argument("--jobs", type=int, default=2, help="trainer trials run at once (SIGTERM trials: always 1)")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary dir, removed)")
    parser.add_argument("--no-snapshot", action="store_true", help="run the live tree, not a copy")
    args = parser.parse_args(argv)
    counts = QUICK if args.quick else FULL
    t_start = time.time()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="jaxdsc-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    digest = source_digest(ROOT)
    src = ROOT if args.no_snapshot else snapshot(work / "src")
    sys.path[:0] = [str(src / "scripts"), str(src)]
    import _faults_files as files
    import _faults_lib as lib

    if not args.no_snapshot and Path(lib.__file__).resolve().parent != (src / "scripts").resolve():
        raise SystemExit(f"the trial library was not imported from the snapshot: {lib.__file__}")
    rng = random.Random(args.seed)
    report = Report()
    print(f"jaxdsc reliability figures ({'quick' if args.quick else 'full'} counts, seed {args.seed}, "
          f"sources {digest}, workdir {work})", flush=True)

    # ------------------------------------------------------------ training faults
    env = lib.Env(work / "env")
    env.prepare()
    trials_dir = work / "trials"
    trials_dir.mkdir(exist_ok=True)
    all_steps = list(range(1, lib.TOTAL + 1))

    kill_steps = steps_for(rng, counts["kill"], all_steps)
    kills = run_parallel(args.jobs, [lambda k=k, i=i: lib.kill_trial(env, trials_dir / f"kill{i}-{k}", k)
                                     for i, k in enumerate(kill_steps)])
    report.add("kill -9 at a random step, rerun: final params/BN/optimizer bit-exact", kills,
               f"kill steps cover {len(set(kill_steps))} of the {lib.TOTAL} steps", steps=kill_steps)

    term_steps = steps_for(rng, counts["sigterm"], all_steps)
    terms = run_parallel(1, [lambda k=k, i=i: lib.sigterm_trial(env, trials_dir / f"term{i}-{k}", k)
                             for i, k in enumerate(term_steps)])
    exits = [t.figures["exit_s"] for t in terms if "exit_s" in t.figures]
    report.add("SIGTERM at a random step: exit 0 within 5 s, step saved, resume bit-exact", terms,
               f"steps cover {len(set(term_steps))} of {lib.TOTAL}; exit after the signal: max {max(exits, default=float('nan')):.2f} s, "
               f"median {statistics.median(exits) if exits else float('nan'):.2f} s", exit_s=exits, steps=term_steps)

    combos = [(stage, kind) for stage in lib.STAGES for kind in ("exit", "exception")]
    crash_plan = [(*combos[i % len(combos)], rng.choice(lib.SAVED)) for i in range(counts["crash"])]
    crashes = run_parallel(args.jobs, [
        lambda c=c, i=i: lib.crash_trial(env, trials_dir / f"crash{i}-{c[0]}-{c[1]}-{c[2]}", *c)
        for i, c in enumerate(crash_plan)])
    per_combo = {f"{s}/{k}": f"{sum(t.ok for t, c in zip(crashes, crash_plan, strict=True) if c[:2] == (s, k))}/"
                 f"{sum(c[:2] == (s, k) for c in crash_plan)}" for s, k in combos}
    report.add("crash while saving (write/rename/finalize x exit/exception): previous loads, leftovers cleaned, "
               "nothing half-written loaded", crashes, ", ".join(f"{k} {v}" for k, v in per_combo.items()),
               plan=crash_plan)

    resumed = [trials_dir / f"kill{i}-{k}" for i, k in enumerate(kill_steps)]
    resumed += [trials_dir / f"term{i}-{k}" for i, k in enumerate(term_steps)]
    with lib.GATE:
        orders = [lib.check_data_order(env, w) for w in resumed]
        traces = [lib.check_traced_once(lib.read_trace(w)) for w in [env.reference, *resumed]]
    report.add("data order on resume: batch index sequence equals the uninterrupted run's", orders,
               "every step of the kill and SIGTERM trials")
    report.add("no recompilation: train_step traced once per process, resumes included", traces,
               f"runs; {sum(t.figures.get('processes', 0) for t in traces)} processes that exited normally in the "
               "reference, kill and SIGTERM runs")

    skip_steps = steps_for(rng, counts["nan_skip"], all_steps[1:])
    skips = run_parallel(args.jobs, [lambda k=k, i=i: lib.nan_skip_trial(env, trials_dir / f"nan{i}-{k}", k)
                                     for i, k in enumerate(skip_steps)])
    report.add("one NaN batch: skipped, params/BN/optimizer/EMA unchanged, the run finishes", skips,
               f"steps {skip_steps}")
    stop_steps = steps_for(rng, counts["nan_stop"], all_steps[:lib.TOTAL - 2])
    stops = run_parallel(args.jobs, [lambda k=k, i=i: lib.nan_stop_trial(env, trials_dir / f"nanstop{i}-{k}", k)
                                     for i, k in enumerate(stop_steps)])
    report.add("persistent NaNs: stop naming the step range; last checkpoint finite and from before", stops,
               f"first NaN at steps {stop_steps}")

    # ------------------------------------------------------------ checkpointer
    with lib.GATE:
        keeps = [files.keep_n_trial(work / f"keep{n}", n, counts["keep_saves"]) for n in (1, 2, 3, 5)]
        report.add("keep-N: after many saves exactly N checkpoints, no temporary dirs", keeps,
                   f"N=1,2,3,5 x {counts['keep_saves']} saves; the trainer's keep 2 after {lib.TOTAL} saves: in each NaN-skip trial")
        mism = files.mismatch_trials(env.ref_arrays(), work / "mismatch")
        report.add("trainer checkpoint into another shape/dtype: refused before restore, naming entry, stored, "
                   "expected", mism, "every entry of a run's state x (shape, dtype)")
        tbm = files.torch_bridge_mismatch_trials(counts["tb_mismatch"])
        report.add("torch_bridge state dict of another shape/dtype: refused naming tensor, stored, expected; "
                   "module untouched", tbm, "every tensor of a DSCNet x (shape, dtype)")

        # -------------------------------------------------------- files
        sec = work / "security"
        sec.mkdir()
        sanity = [lib.Trial(files.payload_works(sec, p), f"{p} payload does not run") for p in files.PAYLOADS]
        loaders = files.loaders(sec, env.data)
        pickles = [files.pickle_trial(sec, name, load, suffix, payload) for name, load in loaders.items()
                   for suffix in files.SUFFIXES for payload in files.PAYLOADS]
        pickles = sanity + pickles if not all(t.ok for t in sanity) else pickles
        report.add("pickle payloads refused, never executed", pickles,
                   f"{len(loaders)} loaders x {len(files.SUFFIXES)} extensions x {len(files.PAYLOADS)} containers; "
                   f"each payload runs when unpickled unsafely: {sum(t.ok for t in sanity)}/{len(sanity)}")
        report.add("plain PyTorch state dicts read only with torch.load(weights_only=True)",
                   weights_only_trials(sec, lib, files), "every loader that reads .pt/.pth/.bin/.ckpt")

        good = files.valid_file(sec / "good.safetensors")
        blob = good.read_bytes()
        flips = [files.bitflip_trial(blob, sec / "flip.safetensors", rng.randrange(1 << 30), rng.randrange(8))
                 for _ in range(counts["bitflips"])]
        report.add("bit flip in the data region detected, naming the tensor", flips,
                   f"{counts['bitflips']} random flips, read + load")
        fuzz, fuzz_counts = run_fuzz(files, sec, blob, counts["fuzz"], args.seed)
        report.add("fuzz: only ValueError subclasses (CheckpointError/ConfigError), never another exception",
                   fuzz, ", ".join(f"{k} {v}" for k, v in fuzz_counts.items()) + "; 7 readers")

    # ------------------------------------------------------------ inputs
    report.add("invalid arguments/inputs, JAX module and PyTorch twin alike (tests/test_bad_input.py)",
               *bad_input_rows(lib))
    report.add("ruff S101 (no assert in library code) on jaxdsc/ torch_bridge/ train/", *ruff_s101(lib))

    elapsed = time.time() - t_start
    changed = source_digest(ROOT) != digest
    ok = all(r["ok"] for r in report.rows)
    print(f"all properties hold: {'yes' if ok else 'NO'} ({elapsed / 60:.1f} min"
          + ("; note: the working tree changed during the run, the figures are for the snapshot" if changed else "")
          + ")", flush=True)
    for row in report.rows:
        for failure in row["failures"]:
            print(f"  FAILED {row['property'][:40]}...: {failure}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "ok": ok, "quick": args.quick, "seed": args.seed, "jobs": args.jobs, "elapsed_s": round(elapsed, 1),
            "sources": digest, "sources_changed_during_run": changed, "git_head": git_head(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python scripts/faults.py" + (" --quick" if args.quick else "") + f" --seed {args.seed}",
            "properties": report.rows}, indent=1) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def git_head() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() or "unknown"


def weights_only_trials(tmp: Path, lib: Any, files: Any) -> list[Any]:
    import torch
    from flax import nnx

    import jaxdsc
    import torch_bridge

    twin = torch_bridge.to_torch(jaxdsc.models.DSCNet(10, width=4, depth=1, rngs=nnx.Rngs(0)))
    real = torch.load
    out = []
    for i, (name, load) in enumerate(files.loaders(tmp).items()):
        if name in ("torch_bridge.load(jax)", "torch_bridge.load(torch)", "torch_bridge.read", "--init-from"):
            continue  # torch_bridge.save files only: no torch.load at all
        for suffix in (".pt", ".pth", ".bin", ".ckpt"):
            path = tmp / f"plain{i}{suffix}"
            torch.save(twin.state_dict(), path)
            calls: list[Any] = []
            torch.load = lambda *a, _c=calls, **k: _c.append(k.get("weights_only")) or real(*a, **k)
            try:
                load(path)
                ok = bool(calls) and all(c is True for c in calls)
                out.append(lib.Trial(ok, "" if ok else f"{name} {suffix}: torch.load weights_only={calls}"))
            except Exception as e:
                out.append(lib.Trial(False, f"{name} {suffix}: {type(e).__name__}: {str(e)[:200]}"))
            finally:
                torch.load = real
    return out


def run_fuzz(files: Any, tmp: Path, blob: bytes, n: int, seed: int) -> tuple[list[Any], dict[str, int]]:
    """Hypothesis-generated random files, truncations and byte flips of a valid file through every reader."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import torch_bridge

    original = torch_bridge.read(tmp / "good.safetensors").tensors
    readers = {**files.fuzz_readers(), **{k: v for k, v in files.loaders(tmp).items() if k.startswith("jaxdsc-convert")}}
    out: list[Any] = []
    cfg = settings(max_examples=n, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))

    @cfg
    @given(data=st.binary(max_size=4096), suffix=st.sampled_from(files.SUFFIXES))
    def random_bytes(data: bytes, suffix: str) -> None:
        out.append(files.fuzz_one(tmp / f"random{suffix}", data, None, readers))

    @cfg
    @given(cut=st.integers(0, len(blob) - 1))
    def truncations(cut: int) -> None:
        out.append(files.fuzz_one(tmp / "cut.safetensors", blob[:cut], None, readers))

    @cfg
    @given(position=st.integers(0, len(blob) - 1), value=st.integers(1, 255))
    def byte_flips(position: int, value: int) -> None:
        flipped = bytearray(blob)
        flipped[position] ^= value
        out.append(files.fuzz_one(tmp / "flipped.safetensors", bytes(flipped), original, readers))

    figures = {}
    for fn in (random_bytes, truncations, byte_flips):
        before = len(out)
        fn()
        figures[fn.__name__.replace("_", " ")] = len(out) - before
    del seed  # hypothesis is derandomized: the same examples every run
    return out, figures


def bad_input_rows(lib: Any) -> tuple[list[Any], str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_input.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    passed = int((re.search(r"(\d+) passed", done.stdout) or [0, 0])[1])
    failed = int((re.search(r"(\d+) failed", done.stdout) or [0, 0])[1])
    rows = len(re.findall(r"^    Row\(", (ROOT / "tests" / "test_bad_input.py").read_text(), flags=re.M))
    trials = [lib.Trial(True)] * passed + [lib.Trial(False, "a test_bad_input test failed")] * failed
    return trials, f"{rows} table rows, each raised in both frameworks; pytest: {passed} passed, {failed} failed"


def ruff_s101(lib: Any) -> tuple[list[Any], str]:
    ruff = shutil.which("ruff")
    if ruff is None:
        return [lib.Trial(False, "ruff not installed")], "ruff not installed"
    done = subprocess.run([ruff, "check", "--select", "S101", "--no-cache", "--output-format", "concise",
                           *PACKAGES], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    hits = [line for line in done.stdout.splitlines() if "S101" in line]
    files = sum(1 for pkg in PACKAGES for _ in (ROOT / pkg).rglob("*.py"))
    trials = [lib.Trial(done.returncode == 0, "; ".join(hits[:5]) or done.stderr[:300])]
    return trials, f"{len(hits)} violations in {files} files"


if __name__ == "__main__":
    sys.exit(main())
