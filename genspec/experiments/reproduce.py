"""The reproduction ledger: every spec that states a paper's numbers (`source.reported`), beside
what its run measured, with the protocol, time, hardware and commit that produced it.

`genspec reproduce SPEC_OR_FOLDER...` trains the specs whose run folders are not finished yet
(resuming interrupted ones, and training a classifier run first where a spec's extractor needs
it), then writes reports/REPRODUCTION.md and reports/reproduction.json. With --collect it trains
nothing and builds the ledger from the run folders as they are. The ledger is rebuilt from the
folders alone (no clock, no machine state), so collecting twice gives the same files.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from genspec.errors import Problem, RunError, SpecError
from genspec.measure.provenance import describe
from genspec.report.run_report import REPORTED_ALIASES, flat_results
from genspec.lang.resolve import is_fragment
from genspec.lang.validate import project_root

LEDGER_MD = "REPRODUCTION.md"
LEDGER_JSON = "reproduction.json"
REASONS = "reproduction_reasons.yaml"  # why a row falls short or was not run, found by experiment (committed)
STATUSES = ("reproduced", "within_tolerance", "below", "not_run")
REPRODUCED, TOLERANCE = 0.05, 0.20  # relative distance to the paper's value, in the metric's bad direction

# A metric's good direction, by the words in its name. Unknown names are judged by distance alone.
LOWER_IS_BETTER = ("distance", "fid", "kid", "loss", "nll", "nelbo", "rec", "mse", "error", "m_global")
HIGHER_IS_BETTER = ("inception_score", "is", "accuracy", "elbo", "precision", "recall")


@dataclass
class Entry:
    """One spec of the ledger: its file, its resolved spec, and where its run lives."""
    file: Path
    spec: object
    folder: Path
    metrics: dict | None = None
    history: list = field(default_factory=list)
    not_run: str | None = None  # why the spec has no finished run


# ---------------------------------------------------------------- which specs

def spec_files(targets: list[str]) -> list[Path]:
    """Spec files named directly, and every *.yaml under a named folder, in a stable order.
    Under a folder, names starting with `_` are fragments (a reading that specs mix in through a
    list `extends`), not specs of their own, and are skipped."""
    files = []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.yaml") if p.is_file() and not is_fragment(p, path))
        elif path.is_file():
            files.append(path)
        else:
            raise RunError(f"{target}: no such spec file or folder")
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def reported(spec) -> dict:
    source = spec.source if isinstance(spec.source, dict) else {}
    return dict(source.get("reported") or {})


def entries(targets: list[str]) -> list[Entry]:
    """The plain specs among the targets that state reported numbers (studies keep their tables
    in study.md; a spec without `source.reported` has nothing to compare)."""
    from genspec.graph.pipeline import is_study, load_runs

    out, problems = [], []
    for file in spec_files(targets):
        try:
            runs = load_runs(file)
        except SpecError as exc:
            problems += exc.problems
            continue
        if is_study(runs):
            continue
        spec = runs[0][1]
        if reported(spec):
            out.append(Entry(file, spec, run_folder(file, spec.name)))
    if problems:
        raise SpecError(problems)
    return out


def run_folder(file: Path, name: str) -> Path:
    """reports/<name> in the spec's project, where `genspec run` from the project puts it."""
    return (project_root(str(file)) or Path.cwd()) / "reports" / name


# ---------------------------------------------------------------- running

def command(entry: Entry) -> str:
    """The exact command that makes this row's run, from the project folder."""
    return f"genspec run {shlex.quote(spec_label(entry))}"


def missing_needs(spec) -> str | None:
    """What this machine lacks to train and score the spec (its data, Inception weights), in words;
    None when it has everything."""
    from genspec.measure import fidelity
    from genspec.data.datasets import load_data

    try:
        load_data(spec.data, spec.train["seed"])
    except RunError:
        # the loader's own message (run the command to see it) names this machine's paths
        return f"data absent here: no {spec.data['dataset']} under data.root / $GENSPEC_DATA"
    if fidelity.requested(spec.evaluate) and fidelity.choose_extractor(spec.evaluate) == "inception":
        try:
            fidelity.inception_weights(spec.evaluate)
        except RunError:
            return "Inception weights absent here (genspec never downloads them)"
    return None


def classifier_dependencies(entry: Entry) -> list[Path]:
    """Classifier run folders the spec's extractor or balancing reads that are not finished yet."""
    from genspec.train.folder import finished_metrics

    named = []
    extractor = entry.spec.evaluate.get("extractor")
    if isinstance(extractor, dict) and isinstance(extractor.get("classifier"), str):
        named.append(extractor["classifier"])
    features = entry.spec.train.get("balance", {}).get("features")
    if isinstance(features, dict) and isinstance(features.get("classifier"), str):
        named.append(features["classifier"])
    root = project_root(str(entry.file)) or Path.cwd()
    folders = [Path(n) if Path(n).is_absolute() else root / n for n in named]
    return [f for f in folders if finished_metrics(f) is None]


def spec_named(root: Path, name: str) -> Path | None:
    """The spec in the project's specs/ whose `name:` is this (the spec that makes reports/<name>)."""
    for file in sorted((root / "specs").rglob("*.yaml")):
        try:
            data = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and data.get("name") == name:
            return file
    return None


def train_entry(entry: Entry, progress: bool, say=print) -> None:
    """Train one spec into its run folder: resume an interrupted run, start a fresh one."""
    from genspec.train.folder import CHECKPOINT
    from genspec.experiments.run import run

    resume = (entry.folder / CHECKPOINT).exists()
    began = time.perf_counter()
    say(f"reproduce: {'resuming' if resume else 'training'} {entry.spec.name} ({command(entry)}) into {entry.folder}")
    # without a checkpoint, genspec run starts a folder left in a first epoch afresh by itself,
    # and refuses one that holds another run's files: nothing is ever overwritten from here
    run(entry.spec, out=entry.folder, resume=resume, overwrite=False, progress=progress)
    say(f"reproduce: {entry.spec.name} took {time.perf_counter() - began:.0f} s")


def train_missing(todo: list[Entry], progress: bool = True, say=print) -> None:
    """Train every entry without a finished run whose needs this machine has; classifier runs
    that an entry's extractor reads are trained first. Entries that cannot run get `not_run`."""
    from genspec.graph.pipeline import load_spec
    from genspec.train.folder import finished_metrics

    for entry in todo:
        if finished_metrics(entry.folder) is not None:
            continue
        lacking = missing_needs(entry.spec)
        if lacking:
            entry.not_run = lacking
            say(f"reproduce: {entry.spec.name} not run: {lacking}")
            continue
        for folder in classifier_dependencies(entry):
            maker = spec_named(folder.parent.parent, folder.name)
            if maker is None:
                raise RunError(f"{entry.file}: its extractor reads {folder}, which is not a finished run, and no spec "
                               f"in {folder.parent.parent / 'specs'} is named {folder.name}")
            dependency = Entry(maker, load_spec(maker), folder)
            say(f"reproduce: {entry.spec.name} needs the classifier run {folder}: training {maker} first")
            train_entry(dependency, progress, say)
        # the spec resolved its extractor's folder before that folder existed: resolve it again
        entry.spec = load_spec(entry.file)
        train_entry(entry, progress, say)


# ---------------------------------------------------------------- the rows

def direction(metric: str) -> str:
    """'higher', 'lower' or 'closer': which way a metric is better."""
    words = metric.lower().replace(".", "_").split("_")
    name = metric.lower()
    if "std" in words:  # a spread: neither larger nor smaller is better
        return "closer"
    if any(w in LOWER_IS_BETTER for w in words) or any(k in name for k in ("distance", "m_global")):
        return "lower"
    if any(w in HIGHER_IS_BETTER for w in words) or "inception_score" in name:
        return "higher"
    return "closer"


def status(metric: str, paper: float, ours: float | None) -> str:
    """reproduced within 5% of the paper (or better), within_tolerance within 20%, else below."""
    if ours is None or not math.isfinite(ours):
        return "not_run"
    scale = abs(paper) or 1.0
    shortfall = {"higher": paper - ours, "lower": ours - paper, "closer": abs(ours - paper)}[direction(metric)] / scale
    if shortfall <= REPRODUCED:
        return "reproduced"
    return "within_tolerance" if shortfall <= TOLERANCE else "below"


def std_of(results: dict, key: str) -> float | None:
    """The spread the run gives with a value: IS's std over its splits, a metric's `_std` twin."""
    for twin in (key.replace("_mean", "_std"), f"{key}_std"):
        if twin != key and isinstance(results.get(twin), (int, float)):
            return float(results[twin])
    return None


def load_history(folder: Path) -> list:
    try:
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def seconds(metrics: dict, history: list) -> float | None:
    train = metrics.get("train_time_s")
    if train is None and history:
        train = sum(h.get("time_s", 0) for h in history if "epoch" in h)
    if train is None:
        return None
    return round(train + (metrics.get("eval_time_s") or 0), 3)  # a tiny run takes under 0.05 s


def protocol_text(entry: Entry, metrics: dict, metric: str) -> str:
    """How the run measured this number: the extractor, samples and IS splits of a sample metric
    (the generator's samples, or a classifier run's real images), or the split a test number is on."""
    key = REPORTED_ALIASES.get(metric, metric)
    real = metrics.get("real") or {}
    if key in metrics.get("fidelity", {}):
        protocol, asked = metrics.get("protocol") or {}, entry.spec.evaluate
    elif key in real:
        protocol, asked = real.get("protocol") or {}, entry.spec.evaluate.get("real", {})
    elif key == "test_accuracy":
        return f"test split ({metrics.get('data', {}).get('test', 0):,} images)"
    else:
        return "test split" if key in metrics.get("test", {}) else ""
    samples = protocol.get("samples") if isinstance(protocol.get("samples"), dict) else {}
    parts = [protocol.get("extractor", "")]
    for name, count in samples.items():
        splits = (asked.get(name) or {}).get("splits") if name == "is" and isinstance(asked.get(name), dict) else None
        parts.append(f"{name.upper()} of {count:,} {'real images' if protocol is real.get('protocol') else 'samples'}"
                     + (f" in {splits} splits" if splits else ""))
    root = project_root(str(entry.file))
    text = "; ".join(p for p in parts if p)
    return text.replace(f"{root}/", "") if root else text  # the project's paths, not this machine's


def comparable(entry: Entry, metrics: dict, metric: str) -> bool:
    """False where the paper measured with Inception and the run with a substitute classifier: the
    number is then on another scale and only the ranking of a paper's rows can be compared."""
    source = entry.spec.source if isinstance(entry.spec.source, dict) else {}
    key = REPORTED_ALIASES.get(metric, metric)
    if key not in metrics.get("fidelity", {}):
        return True
    extractor = (metrics.get("protocol") or {}).get("extractor", "")
    paper_used = source.get("extractor", "inception")
    return extractor.startswith("inception") == (paper_used == "inception")


def rows_of(entry: Entry, reasons: dict) -> list[dict]:
    """The ledger's rows for one spec: one per reported number."""
    source = entry.spec.source if isinstance(entry.spec.source, dict) else {"paper": str(entry.spec.source)}
    metrics, history = entry.metrics, entry.history
    results = flat_results(metrics) if metrics else {}
    rows = []
    for metric, paper in reported(entry.spec).items():
        key = REPORTED_ALIASES.get(metric, metric)
        ours = results.get(key)
        ours = float(ours) if isinstance(ours, (int, float)) else None
        row = {"spec": spec_label(entry), "name": entry.spec.name, "source": source.get("paper", ""),
               "table": source.get("table", ""), "reading": source.get("reading", PAPER_TEXT), "metric": metric,
               "paper": float(paper), "ours": ours,
               "std": std_of(results, key) if ours is not None else None,
               "epochs": metrics.get("epochs") if metrics else entry.spec.train["epochs"],
               "seconds": seconds(metrics, history) if metrics else None,
               "device": metrics.get("device") if metrics else None,
               "hardware": describe(metrics.get("hardware") or {}) if metrics else None,
               "commit": (metrics.get("commit") or "not recorded") if metrics else None,
               "protocol": protocol_text(entry, metrics, metric) if metrics else "",
               "comparable": comparable(entry, metrics, metric) if metrics else None,
               "status": status(metric, float(paper), ours) if metrics else "not_run",
               "reason": "", "command": command(entry)}
        if metrics and ours is None:
            row["reason"] = "the run did not measure it (its evaluate section does not ask for this metric)"
        elif not metrics:
            row["reason"] = entry.not_run or f"no finished run in {display(entry.folder)}"
        if metrics and not row["comparable"]:
            row["reason"] = ("measured with a substitute extractor: not the paper's scale, so only the ranking of the "
                             "paper's rows is compared")
        written = reasons.get(entry.spec.name)
        if isinstance(written, dict):
            written = written.get(metric) or written.get("all")
        if written:
            row["reason"] = f"{row['reason']}; {written}".strip("; ") if row["reason"] else str(written).strip()
        rows.append(row)
    return rows


def spec_label(entry: Entry) -> str:
    root = project_root(str(entry.file)) or Path.cwd()
    try:
        return str(entry.file.resolve().relative_to(root))
    except ValueError:
        return str(entry.file)


def display(folder: Path) -> str:
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


# ---------------------------------------------------------------- rank agreement

PAPER_TEXT = "the paper's text"  # the reading of a spec that names none (source.reading)


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank (what Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the ranks); None when either side is constant."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def paper_of(row: dict) -> str:
    """The paper a row belongs to: its source without a trailing parenthesis naming the variant
    ('BEGAN v3: ... (BEGAN-CS)' and '... (proposed, L1)' are one paper)."""
    return re.sub(r"\s*\([^()]*\)$", "", row["source"]) or "(no paper named)"


def rank_agreement(rows: list[dict]) -> list[dict]:
    """Per paper, reading and metric with at least three measured rows: do our numbers order the
    rows as the paper's do? The answer that still means something when the scale differs. Readings
    are ranked apart: two readings of one row share its paper value, and a tie between them says
    nothing about the paper's order."""
    groups: dict = {}
    for row in rows:
        if row["ours"] is not None:
            groups.setdefault((paper_of(row), row.get("reading", PAPER_TEXT), row["metric"]), []).append(row)
    out = []
    for (source, reading, metric), members in sorted(groups.items()):
        if len(members) >= 3:
            rho = spearman([r["paper"] for r in members], [r["ours"] for r in members])
            out.append({"source": source, "reading": reading, "metric": metric, "rows": len(members), "spearman": rho})
    return out


# ---------------------------------------------------------------- writing

def load_reasons(folder: Path) -> dict:
    path = folder / REASONS
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise SpecError([Problem(where, (), f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError([Problem(f"{path}:1:1", (), "should map spec names to the reason of their rows")])
    return data


def collect(todo: list[Entry]) -> None:
    from genspec.train.folder import finished_metrics

    for entry in todo:
        entry.metrics = finished_metrics(entry.folder)
        entry.history = load_history(entry.folder) if entry.metrics else []
        if entry.metrics is None and entry.not_run is None:
            lacking = missing_needs(entry.spec)
            entry.not_run = lacking or f"no finished run in {display(entry.folder)}"


def kept_rows(folder: Path, todo: list[Entry]) -> list[dict]:
    """The ledger is a record of every spec measured: the rows of specs this call does not cover
    stay as they were (while their spec file still exists), so `genspec reproduce specs/cgan`
    refreshes the CGAN rows and keeps the others. A measured row of a spec covered here but with
    no finished run in this checkout stays too (run folders are not committed; the ledger is):
    only a new measurement replaces a measurement."""
    try:
        rows = json.loads((folder / LEDGER_JSON).read_text())
    except (OSError, ValueError):
        return []
    measured_now = {spec_label(entry) for entry in todo if entry.metrics is not None}
    covered = {spec_label(entry) for entry in todo}
    root = project_root(str(todo[0].file)) or Path.cwd()
    return [row for row in rows if isinstance(row, dict) and {"spec", "metric", "status"} <= set(row)
            and row["spec"] not in measured_now and (row["spec"] not in covered or row["status"] != "not_run")
            and (root / row["spec"]).is_file()]


def ledger(todo: list[Entry], reasons: dict, kept: list[dict] = ()) -> dict:
    kept_labels = {row["spec"] for row in kept}
    new = (row for entry in todo if spec_label(entry) not in kept_labels for row in rows_of(entry, reasons))
    rows = sorted([*kept, *new], key=lambda r: r["spec"])
    return {"rows": rows, "rank_agreement": rank_agreement(rows)}


def number(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def duration(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 120 else f"{s:.0f} s"


def markdown(book: dict) -> str:
    rows = book["rows"]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines = ["# Reproduction ledger", "",
             "Every spec that states a paper's numbers (`source.reported`), beside what its run measured. "
             "Rebuild from the run folders with `genspec reproduce SPEC_OR_FOLDER... --collect`; without "
             "`--collect` it trains the runs that are missing first.", "",
             "Status: **reproduced** within 5% of the paper or better, **within_tolerance** within 20%, "
             "**below** further off, **not_run** no finished run (the reason says why, the command makes it).", "",
             " · ".join(f"{counts[s]} {s}" for s in STATUSES), ""]
    by_source: dict = {}
    for row in rows:
        by_source.setdefault(paper_of(row), []).append(row)
    for source, members in by_source.items():
        lines += [f"## {source}", "",
                  "| spec | table / row | metric | paper | ours ± std | status | protocol | epochs | wall time | "
                  "hardware | commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in members:
            ours = "" if r["ours"] is None else number(r["ours"]) + (f" ± {number(r['std'], 2)}" if r["std"] is not None else "")
            lines.append(f"| `{r['spec']}` | {r['table']} | {r['metric']} | {number(r['paper'])} | {ours} | {r['status']} | "
                         f"{r['protocol']} | {r['epochs'] if r['epochs'] is not None else ''} | {duration(r['seconds'])} | "
                         f"{r['hardware'] or ''} ({r['device'] or ''}) | {r['commit'] or ''} |".replace(" ()", ""))
        lines.append("")
        explained = [r for r in members if r["reason"]]
        if explained:
            lines += ["Reasons:", ""]
            lines += [f"- `{r['spec']}` {r['metric']} ({r['status']}): {r['reason']}" for r in explained]
            lines.append("")
        missing = [r for r in members if r["status"] == "not_run"]
        if missing:
            lines += ["To run the missing rows (from the project folder):", "", "```"]
            lines += sorted({r["command"] for r in missing})
            lines += ["```", ""]
    if book["rank_agreement"]:
        lines += ["## Rank agreement", "",
                  "Spearman's rank correlation between the paper's values and ours, over the measured rows of a "
                  "paper's metric under one reading of it (1: the same order; it holds where the scales differ).", "",
                  "| paper | reading | metric | rows | Spearman ρ |", "|---|---|---|---|---|"]
        lines += [f"| {g['source']} | {g['reading']} | {g['metric']} | {g['rows']} | "
                  f"{number(g['spearman'], 3) or 'undefined (ties)'} |" for g in book["rank_agreement"]]
        lines.append("")
    return "\n".join(lines)


def write(book: dict, folder: Path) -> tuple[Path, Path]:
    from genspec.train.folder import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / LEDGER_MD, folder / LEDGER_JSON
    atomic_write_text(js, json.dumps(book["rows"], indent=2) + "\n")
    atomic_write_text(md, markdown(book))
    return md, js


def reproduce(targets: list[str], collect_only: bool = False, out: str | None = None, progress: bool = True,
              say=print) -> dict:
    """Train what is missing (unless collect_only), then write the ledger. Returns it."""
    todo = entries(targets)
    if not todo:
        raise RunError(f"none of {', '.join(targets)} states a paper's numbers (source.reported)")
    folder = Path(out) if out else (project_root(str(todo[0].file)) or Path.cwd()) / "reports"
    reasons = load_reasons(folder)
    if not collect_only:
        train_missing(todo, progress, say)
    collect(todo)
    book = ledger(todo, reasons, kept_rows(folder, todo))
    md, js = write(book, folder)
    counts = ", ".join(f"{sum(r['status'] == s for r in book['rows'])} {s}" for s in STATUSES)
    say(f"reproduce: {len(book['rows'])} rows ({counts}); ledger in {display(md)} and {display(js)}")
    for group in book["rank_agreement"]:
        say(f"reproduce: rank agreement {group['source']} ({group['reading']}) {group['metric']}: "
            f"Spearman {number(group['spearman'], 3)} "
            f"over {group['rows']} rows")
    return book
