"""The command line: parses arguments and calls the pipeline stages; nothing else.

Spec problems print as `FILE:LINE:COL: key.path: message` and exit with status 2; run
problems (missing data, diverged loss, refused resume) print one message and exit 1.
`validate`, `show` and `graph` never import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from genspec.errors import Location, Problem, RunError, SpecError, plural, writing


def cmd_validate(args) -> int:
    from genspec.graph.pipeline import is_study, load_runs

    failed = []
    for path in args.specs:
        try:
            runs = load_runs(path, args.set, args.only)
        except SpecError as exc:
            failed.append(fragment_hint(path, exc))
            continue
        if is_study(runs):
            from genspec.experiments.study import plan_study

            seeds = len(plan_study(path, args.set, args.only, None)[1]) // len(runs)
            print(f"{path}: ok ({runs[0][1].name}: {plural(len(runs), 'configuration')} x {plural(seeds, 'seed')} = "
                  f"{plural(len(runs) * seeds, 'run')}, each valid)")
            continue
        spec = runs[0][1]
        nets = ", ".join(f"{n} {net.info.trainable + net.info.frozen:,}" for n, net in spec.networks.items())
        print(f"{path}: ok ({spec.name}: {nets} parameters)")
    if failed:
        raise SpecError([p for exc in failed for p in exc.problems])
    return 0


def fragment_hint(path: str, exc: SpecError) -> SpecError:
    """A file in a `_` folder is a fragment (a reading mixed into specs by a list `extends`): say so
    beside the keys it lacks, which it is meant to lack."""
    from genspec.lang.resolve import is_fragment

    if not is_fragment(Path(path)):
        return exc
    note = Problem(Location(str(path), 1, 1), (), "a fragment (its name or its folder's starts with `_`), not a spec: "
                   "validate a spec that mixes it in with `extends: [<spec>.yaml, <this file>]`")
    return SpecError([note, *exc.problems])


def cmd_show(args) -> int:
    from genspec.graph.pipeline import load_runs
    from genspec.report.run_report import layer_tables, optimiser_table, show_json

    runs = load_runs(args.spec, args.set, args.only)
    if args.json:
        shown = {run.id: show_json(spec) for run, spec in runs}
        print(json.dumps(shown[""] if list(shown) == [""] else {"runs": shown}, indent=2))
        return 0
    for run, spec in runs:
        if run.id:
            print(f"=== {run.id}\n")
        print(layer_tables(spec) + "\n\n" + optimiser_table(spec) + ("\n" if run.id else ""))
    return 0


def cmd_graph(args) -> int:
    from genspec.graph import dependencies as graph
    from genspec.graph.pipeline import load_spec

    if args.out and args.format != "png":
        raise RunError("--out is where --format png writes its picture; the other formats print to the terminal")
    spec = load_spec(args.spec, args.set)
    g = spec.graph_nx
    if args.format == "dot":
        print(graph.to_dot(g))
    elif args.format == "json":
        print(json.dumps(graph.to_json(g), indent=2))
    elif args.format == "png":
        from genspec.graph.picture import plot_graph

        out = Path(args.out or f"{spec.name}_graph.png")
        plot_graph(g, out, f"{spec.name}: dependency graph, data flowing left to right")
        print(f"wrote {out}")
    else:
        print(graph.to_text(g))
    return 0


def _executor(args):
    """--executor and its --slurm-* flags: None (train here) or the slurm executor."""
    from genspec.experiments.cluster import executor_from

    return executor_from(args.executor, args.slurm_partition, args.slurm_time, args.slurm_gpus, args.slurm_cpus,
                         args.slurm_mem)


def cmd_run(args) -> int:
    from genspec.graph.pipeline import is_study, load_runs

    if args.tracking is not None:  # the spec's train.tracking, from the command line (checked as the spec's is)
        args.set = [*args.set, tracking_override(args.tracking)]
    runs = load_runs(args.spec, args.set, args.only)  # every spec problem surfaces before anything is written
    executor = _executor(args)
    if executor is not None and not is_study(runs):
        raise RunError("--executor slurm submits the runs of a study (a spec with `sweep` or `repeats`) as jobs; "
                       "one run is one job: submit `genspec run` itself, e.g. with sbatch --wrap")
    nproc = args.nproc
    if nproc is not None and nproc < 1:
        raise RunError(f"--nproc must be a positive number of processes, got {nproc}")
    if nproc is not None and nproc > 1 and os.environ.get("WORLD_SIZE") is None:
        if is_study(runs):
            raise RunError("--nproc trains one spec across processes; run a study's runs one by one or without it")
        from genspec.compiler.distributed import check_batch_split, launch

        check_batch_split(runs[0][1], nproc)
        return launch(_without_nproc(args.argv), nproc)
    if is_study(runs):
        from genspec.experiments.study import run_study

        if args.resume:
            raise RunError("a study resumes by itself: run it again (finished runs are skipped, interrupted ones resumed)")
        run_study(args.spec, args.set, args.only, args.out, overwrite=args.overwrite, progress=not args.no_progress,
                  parallel=args.parallel, stack=args.stack, executor=executor)
        return 0
    if args.parallel != 1 or args.stack:  # --no-stack is what a single run does anyway
        raise RunError("--parallel and --stack train the runs of a study (a spec with `sweep` or `repeats`) together; "
                       "to spread one run over processes use --nproc")
    spec = runs[0][1]
    from genspec.experiments.run import run

    out = args.out or f"reports/{spec.name}"
    try:
        metrics = run(spec, out=args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted_message(Path(out)) + _replaced_note(Path(out))) from None
    except RunError as exc:
        raise RunError(f"{exc}{_replaced_note(Path(out))}") from None
    if not metrics:  # another rank of a distributed run: rank 0 reports
        return 0
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics["test"].items())
    print(f"{spec.name}: done; test {summary}; report in {out}/report.md")
    return 0


def tracking_override(text: str) -> str:
    """--tracking tensorboard,mlflow (or none) as the --set of train.tracking it means."""
    names = [] if text.strip() == "none" else [name.strip() for name in text.split(",") if name.strip()]
    return f"train.tracking={json.dumps(names)}"


def _interrupted_message(out: Path) -> str:
    """What a stopped run left in its folder, and how to go on."""
    from genspec.train.folder import CHECKPOINT, run_files, stopped_before_first_epoch

    if (out / CHECKPOINT).exists():
        return f"interrupted; {out} keeps its last checkpoint, and --resume continues from it"
    if not run_files(out) or stopped_before_first_epoch(out):
        return f"interrupted before the first checkpoint; nothing to resume, and running it again starts afresh in {out}"
    return (f"interrupted before the first checkpoint (train.checkpoint_every); nothing to resume: --overwrite "
            f"starts {out} afresh")


def _replaced_note(out: Path) -> str:
    """Where the run that --overwrite was replacing waits, when the new one did not finish."""
    from genspec.train.folder import replaced_path

    backup = replaced_path(out)
    if not backup.exists():
        return ""
    return (f"\nthe run --overwrite was replacing is kept in {backup}: move its files back into {out} to restore it, "
            "or finish the new run (--resume, or --overwrite again) and it is removed")


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line for each launched process: the same, without --nproc."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def cmd_diff(args) -> int:
    from genspec.report.diff import diff_specs, is_equivalent, render_text
    from genspec.graph.pipeline import load_spec

    problems = []
    specs = []
    for path in (args.a, args.b):
        try:
            specs.append(load_spec(path))
        except SpecError as exc:
            problems += exc.problems
    if problems:
        raise SpecError(problems)
    result = diff_specs(*specs)
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(render_text(result, markdown=args.format == "md"), end="")
    return 0 if is_equivalent(result) else 1


def cmd_sample(args) -> int:
    import math

    import torch
    from torchvision.utils import save_image

    from genspec.train.finished import load_run
    from genspec.graph.grids import generator_of
    from genspec.measure.sampling import generator_parts, interpolation_images, sample_images, to_unit, with_label

    if args.n < 1:
        raise RunError(f"--n must be a positive number of images, got {args.n}")
    run = load_run(args.run_dir)
    source = generator_of(run.spec)
    if source is None:
        grids = run.spec.evaluate.get("grids")
        named = grids.get("samples") if isinstance(grids, dict) else None
        why = (f"; its sample grid is the graph tensor {named!r}, computed from test data (e.g. its labels), which "
               "`sample` does not load: the run's samples.png shows it" if named else "")
        raise RunError(f"{args.run_dir}: no network of this run maps latent draws alone to the data shape{why}")
    module, prior, conditions = generator_parts(run, source)
    if args.label is not None:
        try:
            conditions = with_label(conditions, args.label, list(source[2]))
        except ValueError as exc:
            raise RunError(f"{args.run_dir}: {exc}") from None
    torch.manual_seed(args.seed)
    with torch.no_grad():
        if args.interpolate:
            steps = run.spec.evaluate["interpolation_steps"]
            rows = math.ceil(args.n / steps)  # whole rows: at least the --n images asked for
            images, nrow = interpolation_images(module, prior, rows, steps, "cpu", conditions), steps
        else:
            images, nrow = sample_images(module, prior, args.n, "cpu", conditions), math.ceil(math.sqrt(args.n))
    folder = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent  # an exported run's file
    out = args.out or str(folder / ("interpolations_new.png" if args.interpolate else "samples_new.png"))
    with writing("the samples", out):
        save_image(to_unit(images, run.spec), out, nrow=nrow, padding=2, pad_value=0.5)
    print(f"wrote {len(images)} images from {source[0]}({source[1]}) to {out}")
    return 0


def cmd_export(args) -> int:
    from genspec import __version__
    from genspec.train.finished import load_run

    if args.format == "python" and not args.out:
        raise RunError("--format python writes a folder: give it with --out DIR")
    run = load_run(args.run_dir)
    if args.format == "python":
        from genspec.report.eject import eject

        written = eject(run, Path(args.out), __version__)
        what = "networks, weights and sampler" if any(p.name == "sample.py" for p in written) else \
            "networks and weights (no sample.py: no network maps latent draws alone to the data shape)"
        print(f"wrote the {what} of {run.spec.name} to {args.out}")
        return 0
    from genspec.report.export import default_export_path, export_safetensors

    out = export_safetensors(run, Path(args.out) if args.out else default_export_path(args.run_dir, run.spec.name),
                             __version__)
    print(f"wrote {run.spec.name} (epoch {run.epoch}: {', '.join(run.networks)}) to {out}")
    return 0


def cmd_tune(args) -> int:
    from genspec.experiments.tune import settings_from, tune

    settings = settings_from(args.spec, args.param, args.range or [], args.trials, args.initial, args.metric,
                             args.minimize, args.strategy, args.set)
    result = tune(args.spec, settings, out=args.out, resume=args.resume, overwrite=args.overwrite,
                  progress=not args.no_progress, parallel=args.parallel, executor=_executor(args))
    best = result["best"]
    if best is None:
        print("tune: no trial completed")
        return 1
    point = ", ".join(f"{name} = {best[name]:.5g}" for name in settings.params)
    print(f"tune: best {point}: {settings.metric} = {best['value']:.5g} (trial {best['trial']})")
    return 0


def cmd_is_splits(args) -> int:
    import csv

    from genspec.train.finished import load_run
    from genspec.measure.fidelity import inception_score_by_splits

    run = load_run(args.run_dir)
    rows = inception_score_by_splits(run, args.splits, args.samples, args.seed)
    lines = ["| splits | IS mean | IS std |", "|---|---|---|"] + [
        f"| {r['splits']} | {r['inception_score_mean']:.4f} | {r['inception_score_std']:.4f} |" for r in rows]
    print("\n".join(lines))
    with writing("the IS table", Path(args.run_dir) / "is_splits.md"):
        (Path(args.run_dir) / "is_splits.md").write_text("# Inception score by number of splits\n\n" + "\n".join(lines) + "\n")
        with open(Path(args.run_dir) / "is_splits.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


def cmd_reproduce(args) -> int:
    from genspec.experiments.reproduce import reproduce

    reproduce(args.targets or ["specs"], collect_only=args.collect, out=args.out, progress=not args.no_progress)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genspec", description="Compile model specs (papers' tables as YAML) into training runs.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_set(cmd):
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a spec value, e.g. --set train.epochs=2 (repeatable)")
        return cmd

    def with_executor(cmd, what):
        cmd.add_argument("--executor", choices=("local", "slurm"), default="local",
                         help=f"local (default): train here; slurm: each {what} a SLURM job through submitit "
                              "(pip install -e '.[slurm]'), with job folders in OUT/slurm/")
        slurm = cmd.add_argument_group("SLURM resources of each job (--executor slurm; over the spec's cluster: section)")
        slurm.add_argument("--slurm-partition", metavar="NAME")
        slurm.add_argument("--slurm-time", type=int, metavar="MIN", help="time limit in minutes")
        slurm.add_argument("--slurm-gpus", type=int, metavar="N")
        slurm.add_argument("--slurm-cpus", type=int, metavar="N")
        slurm.add_argument("--slurm-mem", type=float, metavar="GB")
        return cmd

    def with_only(cmd):
        cmd.add_argument("--only", action="append", default=[], metavar="FACTOR=LEVEL",
                         help="for a sweep: only the runs at this level (repeatable)")
        return cmd

    v = with_only(with_set(sub.add_parser("validate", help="check specs without running them")))
    v.add_argument("specs", nargs="+")
    v.set_defaults(func=cmd_validate)
    s = with_only(with_set(sub.add_parser("show", help="print each network's layer table with shapes and parameter counts")))
    s.add_argument("spec")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    g = with_set(sub.add_parser("graph", help="print the dependency graph"))
    g.add_argument("spec")
    g.add_argument("--format", choices=("text", "dot", "json", "png"), default="text",
                   help="png draws the picture a run's report shows (no graphviz needed)")
    g.add_argument("--out", help="where --format png writes (default NAME_graph.png)")
    g.set_defaults(func=cmd_graph)
    d = sub.add_parser("diff", help="semantic diff of two specs (exit 0 equivalent, 1 different, 2 invalid)")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--format", choices=("text", "md", "json"), default="text")
    d.set_defaults(func=cmd_diff)
    sm = sub.add_parser("sample", help="draw fresh samples from a finished run, without retraining")
    sm.add_argument("run_dir", help="a run folder, or a run exported as FILE.safetensors")
    sm.add_argument("--n", type=int, default=64,
                    help="images to draw; with --interpolate, rounded up to whole rows of evaluate.interpolation_steps")
    sm.add_argument("--out", help="PNG file to write (default RUN_DIR/samples_new.png)")
    sm.add_argument("--interpolate", action="store_true", help="an interpolation grid instead")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--label", type=int, help="a conditional generator's class to draw (e.g. 7: only sevens)")
    sm.set_defaults(func=cmd_sample)
    ex = sub.add_parser("export", help="a finished run as one safetensors file, or ejected as plain PyTorch source")
    ex.add_argument("run_dir", help="a run folder (or an exported FILE.safetensors)")
    ex.add_argument("--format", choices=("safetensors", "python"), default="safetensors",
                    help="safetensors: every network's weights and buffers, the spec in the metadata (load_run and "
                         "sample read it); python: a standalone package of nn.Module classes, weights and sample.py")
    ex.add_argument("--out", help="safetensors: the file (default RUN_DIR/NAME.safetensors); python: the folder (required)")
    ex.set_defaults(func=cmd_export)
    t = with_set(sub.add_parser("tune", help="Bayesian optimisation of spec params with Ax"))
    t.add_argument("spec")
    t.add_argument("--param", action="append", default=[], help="a param to tune (repeatable)")
    t.add_argument("--range", action="append", nargs=2, type=float, metavar=("LO", "HI"),
                   help="range of each --param, in order")
    t.add_argument("--trials", type=int, help="trials in all")
    t.add_argument("--initial", type=int, help="quasi-random initial trials")
    t.add_argument("--metric", help="objective metric (a test loss, fid, is, kid, test_accuracy, ...)")
    direction = t.add_mutually_exclusive_group()
    direction.add_argument("--minimize", dest="minimize", action="store_true", default=None)
    direction.add_argument("--maximize", dest="minimize", action="store_false")
    t.add_argument("--strategy", help="gp_ei (default), fast, quality, random_search")
    t.add_argument("--out", help="output folder (default reports/<name>/tune/)")
    t.add_argument("--resume", action="store_true", help="continue a tuning run after a crash or kill")
    t.add_argument("--parallel", default=1, metavar="K",
                   help="run K trials at once, each in its own worker process or with --executor slurm its own "
                        "job (default 1: one after another)")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    with_executor(t, "trial")
    t.set_defaults(func=cmd_tune)
    i = sub.add_parser("is-splits", help="IS of a finished run's samples for several split counts (the n_splits table)")
    i.add_argument("run_dir")
    i.add_argument("--splits", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100, 200])
    i.add_argument("--samples", type=int, help="samples to score (default: evaluate.is.samples)")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_is_splits)
    rp = sub.add_parser("reproduce", help="train the specs that state a paper's numbers and write the paper-vs-run "
                                          "ledger (reports/REPRODUCTION.md, reports/reproduction.json)")
    rp.add_argument("targets", nargs="*", metavar="SPEC_OR_FOLDER", help="spec files or folders of them (default specs/)")
    rp.add_argument("--collect", action="store_true", help="train nothing: build the ledger from the finished run folders")
    rp.add_argument("--out", help="folder for the ledger (default the first spec's project reports/)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    rp.set_defaults(func=cmd_reproduce)
    r = with_only(with_set(sub.add_parser("run", help="train and evaluate a spec (or every run of a sweep), writing a report")))
    r.add_argument("spec")
    r.add_argument("--out", help="output folder (default reports/<name>/)")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    r.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="a study: train K of its runs at once, each in its own process (default 1); "
                        "with --executor slurm, at most K jobs of its array at once")
    r.add_argument("--stack", action=argparse.BooleanOptionalAction, default=None,
                   help="a study: train the seeds of each configuration as one stacked model (torch.func); "
                        "default: the spec's study.stack, auto = on CUDA, off on CPU")
    r.add_argument("--nproc", type=int, metavar="N", help="data-parallel training in N processes on this machine (torchrun; gloo on CPU, NCCL on GPUs)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    with_executor(r, "run of a study")
    r.add_argument("--tracking", metavar="LIST",
                   help="experiment trackers, comma-separated: tensorboard, mlflow, or none (sets train.tracking; "
                        "default: the spec's, or tensorboard)")
    r.set_defaults(func=cmd_run)
    return p


def _speaker() -> str:
    """Who prints a message: `genspec`, or under torchrun `genspec (rank N)`, as every rank of a
    stopped run says why it stopped (the real cause may be on any one of them)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"genspec (rank {os.environ.get('RANK', '?')})"
    return "genspec"


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(map(str, argv)) if argv is not None else sys.argv[1:]
    try:
        return args.func(args)
    except SpecError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"{_speaker()}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `genspec show ... | head` closed the pipe: the reader has what it wanted
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a command killed by the closed pipe exits
    except OSError as exc:  # a folder that cannot be written, a full disk: what the system said, and where
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{_speaker()}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # a study's runs each keep their last checkpoint, and running the study again resumes them
        print(f"genspec: {exc.args[0] if exc.args else 'interrupted; running it again resumes from the last checkpoints'}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
