"""`opd-fast report`: evaluation records (opd_fast.evaluate.records) written by hand for two runs become the exact
markdown table, its JSON and a PNG of the curves; a bad record names its file and line, a run without records says
so."""

import json
import math
import sys

import pytest
from PIL import Image

from opd_fast.cli import main
from opd_fast.evaluate.records import (
    EVAL_FILE,
    EvalRecordError,
    check_eval_record,
    column_name,
    read_eval_records,
    write_eval_record,
)
from opd_fast.evaluate.report import ReportError, build_report, load_run, report_markdown

IN_DOMAIN = {"geneval": ["geneval"], "ocr": ["ocr"]}


def record(step, model, geneval, aesthetic, ocr, seconds=1.5):
    rewards = {"geneval": {"geneval": geneval}, "ocr": {"ocr": ocr}}
    if aesthetic is not None:
        rewards["geneval"]["aesthetic"] = aesthetic
    return {"step": step, "model": model, "seconds": seconds, "rewards": rewards, "in_domain": IN_DOMAIN}


@pytest.fixture
def runs(tmp_path):
    """Two run folders: `opd` (the EMA at steps 0 and 10, the student at 10; step 10's EMA evaluated twice, as a
    resumed run does) and `joint` (its EMA at 10, without the aesthetic score)."""
    opd, joint = tmp_path / "opd", tmp_path / "joint"
    opd.mkdir()
    joint.mkdir()
    for line in [
        record(0, "ema", 0.5, 5.0, 0.25),
        record(10, "ema", 0.1, 1.0, 0.1),  # replaced by the later record of (ema, 10)
        record(10, "student", 0.55, 5.25, 0.3),
        record(10, "ema", 0.6, 5.5, 0.35, seconds=None),
    ]:
        write_eval_record(opd, line)
    write_eval_record(joint, record(10, "ema", 0.7, None, 0.45))
    return opd, joint


LAST = """\
| run | model | step | geneval* | geneval/aesthetic | ocr* | avg | avg* |
|---|---|---:|---:|---:|---:|---:|---:|
| opd | ema | 10 | 0.6000 | 5.5000 | 0.3500 | 2.1500 | 0.4750 |
| opd | student | 10 | 0.5500 | 5.2500 | 0.3000 | 2.0333 | 0.4250 |
| multi-task | ema | 10 | 0.7000 |  | 0.4500 |  | 0.5750 |

Columns marked * are in-domain (a reward its task trains for). avg: the mean of every column; avg*: of the \
in-domain ones. Blank: no such score (an average: a score missing or NaN).
"""


def test_report_prints_each_models_last_evaluation_and_writes_md_json_png(runs, tmp_path, capsys):
    opd, joint = runs
    out = tmp_path / "report"
    assert main(["report", str(opd), f"multi-task={joint}", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout == LAST + f"wrote {out / 'report.md'}, report.json and curves.png\n"
    assert (out / "report.md").read_text() == LAST

    report = json.loads((out / "report.json").read_text())
    assert report["columns"] == [
        {"name": "geneval", "task": "geneval", "reward": "geneval", "in_domain": True},
        {"name": "geneval/aesthetic", "task": "geneval", "reward": "aesthetic", "in_domain": False},
        {"name": "ocr", "task": "ocr", "reward": "ocr", "in_domain": True},
    ]
    first, _, last = report["rows"]
    assert first == {
        "run": "opd",
        "folder": str(opd),
        "model": "ema",
        "step": 10,
        "seconds": None,
        "scores": {"geneval": 0.6, "geneval/aesthetic": 5.5, "ocr": 0.35},
        "avg": pytest.approx(2.15),
        "avg_in_domain": pytest.approx(0.475),
    }
    assert last["run"] == "multi-task" and last["scores"] == {"geneval": 0.7, "ocr": 0.45}
    assert last["avg"] is None and last["avg_in_domain"] == pytest.approx(0.575)

    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and image.mode == "RGBA"
        assert image.size == (1260, 320)  # a panel per column, 3 in a row: 4.2 x 3.2 inches each at 100 dpi
        image.verify()


def test_all_steps_gives_a_row_per_evaluation_and_nan_leaves_the_averages_blank(runs):
    opd, joint = runs
    write_eval_record(joint, record(20, "ema", math.nan, None, 0.5))
    report = build_report([load_run(opd), load_run(joint)], all_steps=True)
    assert [(row["run"], row["model"], row["step"]) for row in report["rows"]] == [
        ("opd", "ema", 0),
        ("opd", "ema", 10),
        ("opd", "student", 10),
        ("joint", "ema", 10),
        ("joint", "ema", 20),
    ]
    assert report["rows"][-1]["scores"] == {"geneval": None, "ocr": 0.5} and report["rows"][-1]["avg_in_domain"] is None
    assert report_markdown(report).splitlines()[-3] == "| joint | ema | 20 | nan |  | 0.5000 |  |  |"


def test_a_table_without_in_domain_rewards_has_no_avg_star_column(tmp_path):
    write_eval_record(tmp_path, {"step": 3, "model": "student", "rewards": {"pickscore": {"pickscore": 21.5}}})
    table = report_markdown(build_report([load_run(tmp_path)]))
    assert table.splitlines()[:3] == [
        "| run | model | step | pickscore | avg |",
        "|---|---|---:|---:|---:|",
        f"| {tmp_path.name} | student | 3 | 21.5000 | 21.5000 |",
    ]


def test_a_malformed_eval_jsonl_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / EVAL_FILE
    good = json.dumps(record(0, "ema", 0.5, 5.0, 0.25))
    path.write_text(good + "\n{not json\n" + good + "\n")
    with pytest.raises(EvalRecordError, match=rf"^{path}:2: not valid JSON"):
        read_eval_records(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"opd-fast: error: {path}:2: not valid JSON (Expecting property name enclosed in double quotes)\n"
    )

    bad = record(0, "ema", 0.5, 5.0, 0.25)
    bad["rewards"]["ocr"]["ocr"] = "high"
    path.write_text(good + "\n" + good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(EvalRecordError, match=rf"^{path}:3: rewards\.ocr\.ocr must be a number, got 'high'"):
        read_eval_records(tmp_path)


def test_a_last_line_cut_short_is_skipped(tmp_path):
    good = json.dumps(record(0, "ema", 0.5, 5.0, 0.25))
    (tmp_path / EVAL_FILE).write_text(good + "\n" + good[:20])  # a kill mid-append: no newline after it
    assert len(read_eval_records(tmp_path)) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"step": -1}, "step must be an integer >= 0, got -1"),
        ({"step": True}, "step must be an integer >= 0, got True"),
        ({"model": ""}, "model must be a non-empty string"),
        ({"seconds": "1s"}, "seconds must be a number >= 0 or null, got '1s'"),
        ({"rewards": {}}, "rewards must be a non-empty object"),
        ({"rewards": {"ocr": {}}}, r"rewards\.ocr must be a non-empty object"),
        ({"in_domain": {"ocr": ["pickscore"]}}, r"in_domain\.ocr names pickscore, not among the rewards of task 'ocr'"),
        ({"in_domain": {"ocr": "ocr"}}, r"in_domain\.ocr must be a list of reward names"),
        ({"reward": {}}, r"unknown key\(s\) reward \(allowed: step, model, rewards, seconds, in_domain\)"),
    ],
)
def test_a_record_that_does_not_fit_the_format_is_refused_before_it_is_written(tmp_path, change, message):
    bad = {**record(0, "ema", 0.5, 5.0, 0.25), **change}
    with pytest.raises(EvalRecordError, match=rf"^evaluation record: {message}"):
        write_eval_record(tmp_path, bad)
    assert not (tmp_path / EVAL_FILE).exists()


def test_a_record_without_its_required_keys_is_refused():
    with pytest.raises(EvalRecordError, match=r"^here: missing key\(s\) model, rewards$"):
        check_eval_record({"step": 1}, "here")


def test_a_run_folder_without_eval_jsonl_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(EvalRecordError, match=r"no eval\.jsonl \(the run has no evaluation records\)"):
        load_run(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"opd-fast: error: {tmp_path / 'missing'}: no such run folder\n"
    (tmp_path / EVAL_FILE).write_text("")
    with pytest.raises(EvalRecordError, match="holds no evaluation record"):
        load_run(tmp_path)


def test_two_runs_under_one_label_are_refused(runs):
    opd, joint = runs
    with pytest.raises(ReportError, match="two runs are labelled x: name them apart"):
        build_report([load_run(f"x={opd}"), load_run(f"x={joint}")])


def test_curves_need_matplotlib_and_say_how_to_install_it(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import machinery: not installed
    assert main(["report", str(runs[0]), "--out", str(tmp_path / "report")]) == 2
    assert "curves.png needs matplotlib: pip install 'opd-fast[report]'" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()  # nothing written


def test_columns_are_named_as_opd_fast_eval_names_them():
    from opd_fast.evaluate.eval import column

    for task, reward in [("geneval", "geneval"), ("ocr", "aesthetic")]:
        assert column_name(task, reward) == column(task, reward)
