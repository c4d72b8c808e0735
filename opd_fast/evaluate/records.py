"""Evaluation records: what a run's evaluations append to OUT/eval.jsonl, and what `opd-fast report` reads.

One evaluation (a model of the run at one step, every task scored) is one JSON line:

    {"step": 200, "model": "ema", "seconds": 41.5,
     "rewards": {"geneval": {"geneval": 0.61, "aesthetic": 5.12},
                 "ocr": {"ocr": 0.43}},
     "in_domain": {"geneval": ["geneval"], "ocr": ["ocr"]}}

    step       int >= 0: the optimizer steps the evaluated weights have taken (0: before training)
    model      non-empty string: which weights, "ema" or "student" (or "base", "teacher:ocr" for reference rows)
    seconds    number >= 0 or null (optional): how long the evaluation took
    rewards    {task: {reward: score}}: each task's prompt set scored by each of its rewards; at least one score
    in_domain  {task: [reward, ...]} (optional, default {}): the rewards a task trains for (its teacher's reward);
               every other score of the task is out of domain. Each name is one of rewards[task]

No other key is allowed: a misspelt one is an error, not a silently missing column. A score is a number (NaN
allowed: a reward that could not score). A table's column for (task, reward) is named as `opd-fast eval`'s results
table names it (column_name). An evaluation that is cut short (a kill mid-append) leaves a last line without its
newline: readers skip it with a warning; any other bad line is an EvalRecordError naming the file and line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"
REQUIRED = ("step", "model", "rewards")
OPTIONAL = ("seconds", "in_domain")


class EvalRecordError(ValueError):
    """An evaluation record that does not fit the format, or a run without records; names the file and line."""


def column_name(task: str, reward: str) -> str:
    """A table column: the reward's name where it is the task's own name (geneval on geneval), else task/reward (the
    naming of opd_fast.evaluate.eval.column)."""
    return reward if task == reward else f"{task}/{reward}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_eval_record(record, where: str = "evaluation record") -> dict:
    """The record if it fits the format (module docstring); EvalRecordError naming `where` and the key otherwise."""
    if not isinstance(record, dict):
        raise EvalRecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise EvalRecordError(f"{where}: missing key(s) {', '.join(missing)}")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise EvalRecordError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(REQUIRED + OPTIONAL)})"
        )
    step, model, rewards = record["step"], record["model"], record["rewards"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise EvalRecordError(f"{where}: step must be an integer >= 0, got {step!r}")
    if not isinstance(model, str) or not model:
        raise EvalRecordError(f"{where}: model must be a non-empty string, got {model!r}")
    seconds = record.get("seconds")
    if seconds is not None and not (_number(seconds) and seconds >= 0):
        raise EvalRecordError(f"{where}: seconds must be a number >= 0 or null, got {seconds!r}")
    if not isinstance(rewards, dict) or not rewards:
        raise EvalRecordError(f"{where}: rewards must be a non-empty object {{task: {{reward: score}}}}")
    for task, scores in rewards.items():
        if not isinstance(scores, dict) or not scores:
            raise EvalRecordError(f"{where}: rewards.{task} must be a non-empty object {{reward: score}}")
        for reward, score in scores.items():
            if not _number(score):
                raise EvalRecordError(f"{where}: rewards.{task}.{reward} must be a number, got {score!r}")
    in_domain = record.get("in_domain", {})
    if not isinstance(in_domain, dict):
        raise EvalRecordError(f"{where}: in_domain must be an object {{task: [reward, ...]}}")
    for task, names in in_domain.items():
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise EvalRecordError(f"{where}: in_domain.{task} must be a list of reward names")
        scored = rewards.get(task, {})
        stray = [name for name in names if name not in scored]
        if stray:
            raise EvalRecordError(
                f"{where}: in_domain.{task} names {', '.join(stray)}, not among the rewards of task {task!r} "
                f"({', '.join(scored) or 'none'})"
            )
    return record


def write_eval_record(out_dir: str | Path, record: dict) -> Path:
    """Check the record and append it to OUT/eval.jsonl as one line (one write); returns the file."""
    path = Path(out_dir) / EVAL_FILE
    check_eval_record(record)
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
    return path


def read_eval_records(out_dir: str | Path) -> list[dict]:
    """Every record of OUT/eval.jsonl in file order. EvalRecordError: no such file, or a bad line (file:line)."""
    path = Path(out_dir) / EVAL_FILE
    if not Path(out_dir).is_dir():
        raise EvalRecordError(f"{out_dir}: no such run folder")
    if not path.is_file():
        raise EvalRecordError(f"{out_dir}: no {EVAL_FILE} (the run has no evaluation records)")
    text = path.read_text()
    lines = text.split("\n")  # a complete file ends with "\n": the last item is then ""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = number == len(lines)  # no newline after it: the append was cut short
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if torn:
                log.warning("%s:%d: skipping a last line that was cut short", path, number)
                continue
            raise EvalRecordError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        records.append(check_eval_record(record, f"{path}:{number}"))
    return records
