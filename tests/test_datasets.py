"""The paper's prompt-set readers (opd_fast.datasets): each layout reads, metadata is kept, and a malformed line is
an error naming file:line and the reason."""

from __future__ import annotations

import json

import pytest

from opd_fast.datasets import ocr_target, read_dataset
from opd_fast.prompts import PromptError

GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a dog left of a cat",
    },
    {
        "tag": "counting",
        "include": [{"class": "cup", "count": 3}],
        "exclude": [{"class": "cup", "count": 4}],
        "prompt": "a photo of three cups",
    },
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_pickscore_txt(tmp_path):
    s = read_dataset(write(tmp_path / "pick.txt", "a cat\n\n  a dog on a sofa  \n"), "pickscore")
    assert s.prompts == ["a cat", "a dog on a sofa"] and s.metadata == [{}, {}]


def test_ocr_targets(tmp_path):
    s = read_dataset(
        write(tmp_path / "ocr.txt", 'A sign that says "OPEN"\n\na shirt reading "Hello World" in red\n'),
        "ocr",
        task="ocr",
    )
    assert [m["text"] for m in s.metadata] == ["OPEN", "Hello World"]
    assert ocr_target('no "" quotes') is None and ocr_target("none") is None


def test_ocr_prompt_without_quotes_names_the_line(tmp_path):
    path = write(tmp_path / "ocr.txt", 'a sign that says "OPEN"\n\na shirt reading hello\n')
    with pytest.raises(PromptError, match=r"task 'ocr': .*ocr\.txt:3: an OCR prompt needs the text .*double quotes"):
        read_dataset(path, "ocr", task="ocr")


def test_geneval_jsonl(tmp_path):
    path = write(tmp_path / "geneval.jsonl", "\n".join(json.dumps(r) for r in GENEVAL) + "\n")
    s = read_dataset(path, "geneval")
    assert s.prompts[1] == "a photo of a dog left of a cat"
    assert s.metadata[1]["include"][1]["position"] == ["left of", 0] and s.metadata[2]["tag"] == "counting"
    assert "prompt" not in s.metadata[0]


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": "x", "include": [{"class": "cat", "count": 1}]}, "needs a string 'tag'"),
        ({"prompt": "x", "tag": "t", "include": []}, "non-empty list 'include'"),
        (
            {"prompt": "x", "tag": "t", "include": [{"class": "cat", "count": 0}]},
            r"include\[0\] needs an integer 'count'",
        ),
        ({"prompt": "x", "tag": "t", "include": [{"count": 1}]}, r"include\[0\] needs a string 'class'"),
        (
            {"prompt": "x", "tag": "t", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]},
            r"include\[0\]\.position must be \[relation, index of an earlier include\]",
        ),
        (
            {
                "prompt": "x",
                "tag": "t",
                "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}],
            },
            "relation one of",
        ),
        (
            {
                "prompt": "x",
                "tag": "t",
                "include": [{"class": "a", "count": 1}],
                "exclude": [{"class": "a", "count": "2"}],
            },
            r"exclude\[0\] needs an integer 'count'",
        ),
    ],
)
def test_geneval_malformed_record_names_line_and_reason(tmp_path, record, reason):
    lines = [json.dumps(GENEVAL[0]), "", json.dumps(record)]
    path = write(tmp_path / "geneval.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(PromptError, match=rf"geneval\.jsonl:3: .*{reason}"):
        read_dataset(path, "geneval")


def test_geneval_broken_json_names_line(tmp_path):
    path = write(tmp_path / "geneval.jsonl", json.dumps(GENEVAL[0]) + "\n{not json\n")
    with pytest.raises(PromptError, match=r"geneval\.jsonl:2: not valid JSON"):
        read_dataset(path, "geneval")


def test_drawbench_csv_and_txt(tmp_path):
    csv_path = write(
        tmp_path / "drawbench.csv", 'Prompts,Category\nA red colored car.,Colors\n"A cat, on a mat.",Positional\n,\n'
    )
    s = read_dataset(csv_path)  # auto: .csv is DrawBench
    assert s.prompts == ["A red colored car.", "A cat, on a mat."]
    assert s.metadata == [{"category": "Colors"}, {"category": "Positional"}]
    assert read_dataset(write(tmp_path / "drawbench.txt", "a\nb\n"), "drawbench").prompts == ["a", "b"]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Text,Category\na,b\n", r"drawbench\.csv:1: no prompt column"),
        ("Prompts,Category\na,b\n,Colors\n", r"drawbench\.csv:3: empty 'Prompts'"),
        ("Prompts,Category\na cat, on a mat,Colors\n", r"drawbench\.csv:2: 3 fields but the header has 2"),
        ("Prompts,Category\n", "prompt file is empty"),
    ],
)
def test_drawbench_malformed(tmp_path, text, reason):
    with pytest.raises(PromptError, match=reason):
        read_dataset(write(tmp_path / "drawbench.csv", text), "drawbench")


def test_kind_and_suffix_mismatch(tmp_path):
    with pytest.raises(PromptError, match="a geneval prompt set is a .jsonl file"):
        read_dataset(write(tmp_path / "g.txt", "a\n"), "geneval")
    with pytest.raises(PromptError, match="unknown prompt set kind"):
        read_dataset(tmp_path / "g.txt", "parti")
    with pytest.raises(PromptError, match="not found"):
        read_dataset(tmp_path / "missing.csv")
