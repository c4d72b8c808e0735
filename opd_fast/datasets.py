"""Readers for the paper's prompt sets, with the checks each set needs before hours of sampling or training.

    pickscore  .txt, one prompt per line (Pick-a-Pic prompts as Flow-GRPO ships them)
    ocr        .txt, one prompt per line, the text to render in double quotes: a sign that says "OPEN"
    geneval    .jsonl, {"prompt", "tag", "include": [{"class", "count", "color"?, "position"?}], "exclude"?}
    drawbench  .csv with a "Prompts" column (and "Category"), as Google's sheet exports it; or .txt

Plain .txt / .jsonl go through prompts.read_prompts (which already names file:line for broken JSON); the
set-specific checks here name the line and the reason too. Errors are PromptErrors, so the CLI reports them.
"""

from __future__ import annotations

import csv
from pathlib import Path

from opd_fast.config import PROMPT_KINDS as KINDS
from opd_fast.prompts import PromptError, PromptSet, check_utf8, read_prompts

GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
DRAWBENCH_PROMPT_COLUMNS = ("Prompts", "Prompt", "prompt", "prompts")
DRAWBENCH_CATEGORY_COLUMNS = ("Category", "category")


def _nonempty_lines(path: Path) -> list[int]:
    """1-based numbers of the non-empty lines: read_prompts keeps one record per such line, in order."""
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def ocr_target(prompt: str) -> str | None:
    """The text an OCR prompt asks to render: what stands between the first pair of double quotes (Flow-GRPO's
    rule, prompt.split('"')[1]); None when there is no quoted text."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 and parts[1].strip() else None


def _check_ocr(prompt_set: PromptSet, where) -> None:
    for i, prompt in enumerate(prompt_set.prompts):
        target = ocr_target(prompt)
        if target is None:
            raise PromptError(
                f"{where(i)}: an OCR prompt needs the text to render in double quotes, e.g. "
                f'a sign that says "OPEN"; got {prompt!r}'
            )
        prompt_set.metadata[i]["text"] = target


def _geneval_requirement(req, index: int, key: str, previous: int) -> str | None:
    """What is wrong with one include/exclude entry, or None."""
    if not isinstance(req, dict):
        return f"{key}[{index}] must be an object, got {req!r}"
    if not isinstance(req.get("class"), str) or not req["class"]:
        return f"{key}[{index}] needs a string 'class'"
    count = req.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return f"{key}[{index}] needs an integer 'count' >= 1, got {count!r}"
    if "color" in req and not isinstance(req["color"], str):
        return f"{key}[{index}].color must be a string, got {req['color']!r}"
    if "position" in req:
        pos = req["position"]
        ok = (
            isinstance(pos, list)
            and len(pos) == 2
            and pos[0] in GENEVAL_RELATIONS
            and isinstance(pos[1], int)
            and not isinstance(pos[1], bool)
            and 0 <= pos[1] < previous
        )
        if not ok:
            return (
                f"{key}[{index}].position must be [relation, index of an earlier include] with relation one of "
                f"{list(GENEVAL_RELATIONS)}, got {pos!r}"
            )
    return None


def _check_geneval(prompt_set: PromptSet, where) -> None:
    for i, meta in enumerate(prompt_set.metadata):
        if not isinstance(meta.get("tag"), str):
            raise PromptError(f"{where(i)}: a GenEval record needs a string 'tag' (single_object, counting, ...)")
        include = meta.get("include")
        if not isinstance(include, list) or not include:
            raise PromptError(f"{where(i)}: a GenEval record needs a non-empty list 'include'")
        for key, reqs in (("include", include), ("exclude", meta.get("exclude", []))):
            if not isinstance(reqs, list):
                raise PromptError(f"{where(i)}: '{key}' must be a list")
            for j, req in enumerate(reqs):
                problem = _geneval_requirement(req, j, key, j if key == "include" else len(include))
                if problem:
                    raise PromptError(f"{where(i)}: {problem}")


def read_drawbench_csv(path: Path, who: str = "") -> PromptSet:
    """DrawBench as the sheet exports it: a prompt column (Prompts) and a Category column, kept as metadata."""
    check_utf8(path, who)
    prompts, metadata = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        prompt_col = next((c for c in DRAWBENCH_PROMPT_COLUMNS if c in columns), None)
        if prompt_col is None:
            raise PromptError(
                f"{who}{path}:1: no prompt column (expected one of {list(DRAWBENCH_PROMPT_COLUMNS)}, found {columns})"
            )
        category_col = next((c for c in DRAWBENCH_CATEGORY_COLUMNS if c in columns), None)
        for row in reader:
            if None in row:  # more fields than the header names: an unquoted comma
                raise PromptError(
                    f"{who}{path}:{reader.line_num}: {len(columns) + len(row[None])} fields but the "
                    f"header has {len(columns)} (quote prompts that contain commas)"
                )
            prompt = (row.get(prompt_col) or "").strip()
            if not prompt:
                if not any((v or "").strip() for v in row.values()):
                    continue  # a blank row
                raise PromptError(f"{who}{path}:{reader.line_num}: empty {prompt_col!r}")
            prompts.append(prompt)
            metadata.append({"category": (row.get(category_col) or "").strip()} if category_col else {})
    if not prompts:
        raise PromptError(f"{who}prompt file is empty: {path}")
    return PromptSet(prompts, metadata, str(path))


def infer_kind(path: Path) -> str:
    return {".csv": "drawbench", ".jsonl": "jsonl"}.get(path.suffix, "txt")


def read_dataset(path: str | Path, kind: str = "auto", task: str = "") -> PromptSet:
    """A prompt set of `kind` (see the module docstring); "auto" goes by the file suffix."""
    path = Path(path)
    who = f"task {task!r}: " if task else ""
    if kind not in KINDS:
        raise PromptError(f"{who}unknown prompt set kind {kind!r} (known: {', '.join(KINDS)})")
    kind = infer_kind(path) if kind == "auto" else kind
    expected = {"pickscore": ".txt", "ocr": ".txt", "geneval": ".jsonl", "txt": ".txt", "jsonl": ".jsonl"}
    if kind == "drawbench" and path.suffix == ".csv":
        if not path.is_file():
            raise PromptError(f"{who}prompt file not found: {path}")
        return read_drawbench_csv(path, who)
    if kind in expected and path.suffix != expected[kind]:
        raise PromptError(f"{who}{path}: a {kind} prompt set is a {expected[kind]} file")
    prompt_set = read_prompts(path, task)
    lines = _nonempty_lines(path)

    def where(i: int) -> str:
        return f"{who}{path}:{lines[i]}"

    if kind == "ocr":
        _check_ocr(prompt_set, where)
    elif kind == "geneval":
        _check_geneval(prompt_set, where)
    return prompt_set
