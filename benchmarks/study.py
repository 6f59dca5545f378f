#!/usr/bin/env python
"""Wall time of the encoderless MNIST study (24 configurations) trained one run after another
(`--no-stack`) against genspec's faster ways: K runs at once in worker processes (`genspec run
STUDY --parallel K --no-stack`) and each configuration's seeds as one stacked model (`--stack`,
torch.func; a plain `genspec run STUDY` does this by default on CUDA).
Measures and prints; asserts nothing.

    .venv/bin/python benchmarks/study.py --quick          # the 12 FC configurations x 2 seeds, 1 epoch of 40 steps
    .venv/bin/python benchmarks/study.py --epochs 5 --parallel 8 --repeats 5
    .venv/bin/python benchmarks/study.py --estimate 1,3     # the thesis's full study (120 runs x 250 epochs), extrapolated

Each result is one JSON line on stdout, also appended to reports/benchmarks/study.jsonl, with
the machine, torch version, device and settings; `ratio` is the sequential wall time divided by
that way's (above 1: faster than one run after another). Every way trains the same runs with the
same seeds into its own folder, and the script reports how far their test losses are apart
(parallel: float rounding only; stacked: the noise draws differ too).

`--estimate A,B` times the full study (24 configurations x 5 repeats, full splits) the fastest
way (`--stack --parallel K`) for A and for B epochs, and extrapolates linearly to the thesis's
250 epochs: wall(A) + (250 - A) x (wall(B) - wall(A)) / (B - A). Its `ratio` is the thesis's
own time for the same runs (250 epochs x its 2 s per epoch each) divided by that estimate;
`goal_s` is the issue's target for all 120 runs, one hour.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "specs" / "encoderless" / "mnist_study.yaml"


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 epoch of at most 40 steps per run, a 2,000-image test split")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="steps per epoch (default: the whole split)")
    p.add_argument("--repeats", type=int, default=2, help="seeds per configuration (the thesis: 5; stacking needs 2 or more)")
    p.add_argument("--parallel", type=int, default=None, help="runs at once (default: CPU cores, at most 8 on a GPU)")
    p.add_argument("--ways", default="parallel,stack,stack_parallel",
                   help="ways to compare with sequential: parallel, stack, stack_parallel (stacked groups, K at once)")
    p.add_argument("--only", action="append", default=[], help="a --only filter for the study, e.g. layers=fc")
    p.add_argument("--estimate", metavar="A,B", help="extrapolate the full 250-epoch study from runs of A and B epochs")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "study")
    return p.parse_args()


def machine() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "python": platform.python_version()}


def train(out: Path, sets: list[str], only: list[str], way: list[str]) -> float:
    """Seconds for `genspec run STUDY [way flags]` into a fresh folder."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "genspec", "run", str(STUDY), "--out", str(out), "--no-progress", *way,
               *[a for s in sets for a in ("--set", s)], *[a for o in only for a in ("--only", o)]]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"benchmark: the study failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return seconds


def test_losses(out: Path) -> dict:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["test"] for p in sorted(out.rglob("metrics.json"))}


def largest_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for run, losses in a.items():
        for name, value in losses.items():
            worst = max(worst, abs(value - b[run][name]) / max(1e-12, abs(value)))
    return worst


THESIS_SECONDS_PER_RUN = 250 * 2.0  # epochs x the thesis's reported 2 s per epoch: 120 runs are about 17 hours


def estimate(args, parallel: int) -> None:
    """The full study the fastest way for A and B epochs, extrapolated to 250 (see the docstring)."""
    a, b = (int(e) for e in args.estimate.split(","))
    sets = ["repeats=5", "evaluate.grid_size=4", "evaluate.fid=null", "evaluate.reference=null", "evaluate.extractor=null"]
    walls = {}
    for epochs in (a, b):
        walls[epochs] = train(args.out / f"estimate_{epochs}", sets + [f"train.epochs={epochs}"], args.only,
                              ["--stack", "--parallel", str(parallel)])
        print(f"benchmark: full study, {epochs} epoch(s): {walls[epochs]:.1f} s", file=sys.stderr, flush=True)
    per_epoch = (walls[b] - walls[a]) / (b - a)
    full = walls[a] + (250 - a) * per_epoch
    runs = len(test_losses(args.out / f"estimate_{a}"))  # 120, or fewer with --only
    emit({"benchmark": "study_estimate", "way": "stack_parallel", "spec": "specs/encoderless/mnist_study.yaml", **machine(),
          "parallel": parallel, "only": args.only, "epochs_timed": [a, b], "wall_s": {str(k): round(v, 2) for k, v in walls.items()},
          "per_epoch_s": round(per_epoch, 3), "estimated_full_study_s": round(full, 1), "goal_s": 3600,
          "runs": runs, "thesis_s": runs * THESIS_SECONDS_PER_RUN, "ratio": round(runs * THESIS_SECONDS_PER_RUN / full, 3)})


def emit(result: dict) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    (ROOT / "reports" / "benchmarks").mkdir(parents=True, exist_ok=True)
    with open(ROOT / "reports" / "benchmarks" / "study.jsonl", "a") as f:
        f.write(line + "\n")


def main() -> None:
    args = arguments()
    import torch

    epochs = 1 if args.quick else args.epochs
    max_steps = 40 if args.quick and args.max_steps is None else args.max_steps
    # on a GPU the runs' host work (Python, evaluation, checkpoints) is what overlaps: as many as 8
    parallel = args.parallel or (min(8, os.cpu_count() or 2) if torch.cuda.is_available() else (os.cpu_count() or 2))
    # training is what is timed: no FID at the end (it needs a classifier run) and grids of 16
    sets = [f"train.epochs={epochs}", f"repeats={args.repeats}", "evaluate.grid_size=4", "evaluate.fid=null",
            "evaluate.reference=null", "evaluate.extractor=null"]
    if max_steps:
        sets.append(f"train.max_steps={max_steps}")
    only = list(args.only)
    if args.quick:
        sets += ["data.split.test=2000", "data.split.val=0"]
        only = only or ["layers=fc"]  # the 12 fully connected configurations
    if not os.environ.get("GENSPEC_DATA") and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["GENSPEC_DATA"] = str(ROOT.parent / "shared" / "data")
    if args.estimate:
        estimate(args, parallel)
        return
    # explicit switches: on CUDA a plain `genspec run STUDY` stacks by default
    ways = {"parallel": ["--parallel", str(parallel), "--no-stack"], "stack": ["--stack"],
            "stack_parallel": ["--stack", "--parallel", str(parallel)]}
    chosen = [w for w in args.ways.split(",") if w]
    print(f"benchmark: encoderless MNIST study, {epochs} epoch(s): sequential, then {', '.join(chosen)}", file=sys.stderr)
    sequential = train(args.out / "sequential", sets, only, ["--no-stack"])
    print(f"benchmark: sequential {sequential:.1f} s", file=sys.stderr)
    base = test_losses(args.out / "sequential")
    for way in chosen:
        seconds = train(args.out / way, sets, only, ways[way])
        print(f"benchmark: {way} {seconds:.1f} s", file=sys.stderr)
        other = test_losses(args.out / way)
        result = {"benchmark": "study", "way": way, "spec": "specs/encoderless/mnist_study.yaml", **machine(),
                  "runs": len(base), "only": only, "epochs": epochs, "max_steps": max_steps, "repeats": args.repeats,
                  "parallel": parallel if "parallel" in way else 1, "sequential_s": round(sequential, 2),
                  "way_s": round(seconds, 2), "ratio": round(sequential / seconds, 3), "same_runs": sorted(base) == sorted(other),
                  "max_rel_test_loss_difference": largest_difference(base, other) if sorted(base) == sorted(other) else None}
        emit(result)


if __name__ == "__main__":
    main()
