"""`opd-fast report RUN [RUN ...]`: runs' evaluations (OUT/eval.jsonl, opd_fast.evaluate.records) as a paper-style
table and reward-against-step curves.

Rows: each run's last evaluation of each model (with --all-steps, every evaluation); columns: every task/reward
score (named as `opd-fast eval` names them), the in-domain ones marked *, then avg (the mean of every column, as in
`opd-fast eval`'s table) and avg* (of the in-domain columns alone: the scores the tasks train for). A cell is blank
where a row has no such score; an average is blank where a row lacks one of its columns or has a NaN.

The table goes to stdout as markdown; --out DIR writes report.md, report.json and curves.png (one panel per
column, a line per run and model; drawn with matplotlib, the `report` extra). A run evaluated again at a step (a
resumed run repeats the evaluations a killed one made after its checkpoint) counts with its last record there.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from opd_fast.evaluate.records import EvalRecordError, column_name, read_eval_records

MARK = "*"  # after an in-domain column's name
LEGEND = (
    "Columns marked * are in-domain (a reward its task trains for). avg: the mean of every column; avg*: of the "
    "in-domain ones. Blank: no such score (an average: a score missing or NaN)."
)


class ReportError(ValueError):
    """The report cannot be made as asked (two runs under one label, no plotting package for curves.png)."""


@dataclass
class Run:
    label: str  # the table's run column
    folder: Path
    records: list[dict]  # one per (model, step): the last one there; by model (first seen), then step


def load_run(spec: str | Path) -> Run:
    """`FOLDER` or `LABEL=FOLDER` (the label defaults to the folder's name); its records, one per (model, step)."""
    spec = str(spec)
    label, _, folder = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    folder = Path(folder)
    records = read_eval_records(folder)
    if not records:
        raise EvalRecordError(f"{folder}: its eval.jsonl holds no evaluation record")
    models = list(dict.fromkeys(record["model"] for record in records))
    last = {(record["model"], record["step"]): record for record in records}  # the later record of a (model, step)
    ordered = sorted(last.values(), key=lambda record: (models.index(record["model"]), record["step"]))
    return Run(label or folder.resolve().name, folder, ordered)


def _columns(records: list[dict]) -> tuple[list[tuple[str, str]], set[tuple[str, str]]]:
    """Every (task, reward) of the records in order of first appearance, and the in-domain ones."""
    columns = {}
    in_domain = set()
    for record in records:
        for task, scores in record["rewards"].items():
            for reward in scores:
                columns.setdefault((task, reward), None)
        for task, rewards in record.get("in_domain", {}).items():
            in_domain.update((task, reward) for reward in rewards)
    return list(columns), in_domain


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None or math.isnan(v) for v in values):
        return None
    return sum(values) / len(values)


def build_report(runs: list[Run], all_steps: bool = False) -> dict:
    """The table as data: {"columns": [{name, task, reward, in_domain}], "rows": [{run, folder, model, step, seconds,
    scores: {column: score}, avg, avg_in_domain}]}; a NaN score is null."""
    labels = [run.label for run in runs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ReportError(f"two runs are labelled {', '.join(twice)}: name them apart with LABEL=FOLDER")
    chosen = []  # (run, record)
    for run in runs:
        if all_steps:
            chosen += [(run, record) for record in run.records]
        else:  # each model's last evaluation (records are by model, then step)
            last = {record["model"]: record for record in run.records}
            chosen += [(run, record) for record in last.values()]
    columns, in_domain = _columns([record for _, record in chosen])
    marked = [column for column in columns if column in in_domain]
    rows = []
    for run, record in chosen:
        values = {column: record["rewards"].get(column[0], {}).get(column[1]) for column in columns}
        rows.append(
            {
                "run": run.label,
                "folder": str(run.folder),
                "model": record["model"],
                "step": record["step"],
                "seconds": record.get("seconds"),
                "scores": {
                    column_name(*column): None if math.isnan(value) else value
                    for column, value in values.items()
                    if value is not None
                },
                "avg": _mean(list(values.values())),
                "avg_in_domain": _mean([values[column] for column in marked]) if marked else None,
            }
        )
    return {
        "columns": [
            {"name": column_name(*column), "task": column[0], "reward": column[1], "in_domain": column in in_domain}
            for column in columns
        ],
        "rows": rows,
    }


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _score_cell(scores: dict, name: str) -> str:
    if name not in scores:
        return ""
    return "nan" if scores[name] is None else _cell(scores[name])


def report_markdown(report: dict) -> str:
    """The table (4 decimals, as `opd-fast eval`'s), then a line that says what * and the averages are."""
    columns = report["columns"]
    marked = any(column["in_domain"] for column in columns)
    names = [column["name"] + (MARK if column["in_domain"] else "") for column in columns]
    names += ["avg"] + (["avg" + MARK] if marked else [])
    lines = ["| run | model | step | " + " | ".join(names) + " |", "|---|---|" + "---:|" * (len(names) + 1)]
    for row in report["rows"]:
        scores = row["scores"]  # (a NaN score is None there)
        cells = [row["run"].replace("|", "\\|"), row["model"].replace("|", "\\|"), str(row["step"])]
        cells += [_score_cell(scores, column["name"]) for column in columns]
        cells += [_cell(row["avg"])] + ([_cell(row["avg_in_domain"])] if marked else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + LEGEND + "\n"


def _check_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("curves.png needs matplotlib: pip install 'opd-fast[report]' (or pip install matplotlib)")


def curves_png(runs: list[Run], path: str | Path) -> None:
    """Reward against step: a panel per column (in-domain ones marked *), a line per run and model, every
    evaluation of each."""
    _check_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend
    from matplotlib.lines import Line2D

    columns, in_domain = _columns([record for run in runs for record in run.records])
    # one color per run and model in every panel, also where a panel lacks some of them
    series = [(run, model) for run in runs for model in dict.fromkeys(record["model"] for record in run.records)]
    colors = {(run.label, model): f"C{i % 10}" for i, (run, model) in enumerate(series)}
    per_row = min(3, len(columns))
    rows = math.ceil(len(columns) / per_row)
    figure = Figure(figsize=(4.2 * per_row, 3.2 * rows), dpi=100, layout="constrained")
    axes = figure.subplots(rows, per_row, squeeze=False).flatten()
    for ax, (task, reward) in zip(axes, columns):
        for run, model in series:
            points = [
                (record["step"], record["rewards"][task][reward])
                for record in run.records
                if record["model"] == model and reward in record["rewards"].get(task, {})
            ]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o", markersize=3, color=colors[(run.label, model)])
        ax.set_title(column_name(task, reward) + (MARK if (task, reward) in in_domain else ""))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("reward")
    handles = [
        Line2D([], [], color=color, marker="o", markersize=3, label=f"{label} ({model})")
        for (label, model), color in colors.items()
    ]
    axes[0].legend(handles=handles, fontsize="small")
    figure.savefig(path, format="png")


def write_report(runs: list[Run], out_dir: str | Path, all_steps: bool = False) -> dict:
    """OUT/report.md, report.json and curves.png; returns report.json's content."""
    _check_matplotlib()  # before anything is written
    report = build_report(runs, all_steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(report_markdown(report))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    curves_png(runs, out_dir / "curves.png")
    return report


def _report(args) -> int:
    try:
        runs = [load_run(spec) for spec in args.runs]
        report = write_report(runs, args.out, args.all_steps) if args.out else build_report(runs, args.all_steps)
    except (EvalRecordError, ReportError) as e:
        print(f"opd-fast: error: {e}", file=sys.stderr)
        return 2
    print(report_markdown(report), end="")
    if args.out:
        print(f"wrote {Path(args.out) / 'report.md'}, report.json and curves.png")
    return 0


def add_subcommand(subparsers) -> None:
    report = subparsers.add_parser(
        "report", help="a paper-style table (and reward curves) of runs' evaluations, from each run's eval.jsonl"
    )
    report.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="run folders (label: the table's run column)")
    report.add_argument("--all-steps", action="store_true", help="a row per evaluation, not each model's last")
    report.add_argument("--out", help="also write report.md, report.json and curves.png (matplotlib) into this folder")
    report.set_defaults(func=_report)
