"""Experiment trackers (opd_fast.trackers): a tiny run mirrors metrics.jsonl, the config and an evaluation's image
grid to TensorBoard and to an offline W&B run (read back from their own files); --resume continues the W&B run;
logging.trackers is checked when the config loads, and a tracker's missing package before anything is opened."""

import json
import struct

import pytest
from conftest import offline_wandb_env
from PIL import Image

from opd_fast import __version__, trainer
from opd_fast.config import TRACKER_NAMES, ConfigError, LoggingConfig
from opd_fast.metrics import MetricsWriter
from opd_fast.trackers import TRACKERS, WandbTracker, check_trackers, git_revision, image_grid


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline in tmp_path (conftest.offline_wandb_env). Tears down W&B's service process after the test."""
    wandb = pytest.importorskip("wandb")
    offline_wandb_env(monkeypatch, tmp_path / "wandb-home")
    yield wandb
    assert wandb.run is None  # every run the test opened was finished
    wandb.teardown()


def wandb_records(path):
    """The protobuf records of a .wandb file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB blocks of
    chunks, each with a 7-byte header: checksum, length, type 1 = whole record, 2/3/4 = first/middle/last part)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zero padding to the end of the block
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb_run(run_folder):
    """(the run record, its config {key: value}, its history {step: {key: value}}) of an offline run's folder."""
    (log_file,) = run_folder.glob("run-*.wandb")
    run, config, history = None, {}, {}
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history[row.pop("_step")] = row
    return run, config, history


class EvaluatingWriter(MetricsWriter):
    """The coming in-training evaluation's stand-in: after each round's record, a grid of 2 prompts x 3 seeds."""

    def write(self, record):
        super().write(record)
        tiles = [Image.new("RGB", (8, 8), (40 * i, 255 - 40 * i, 0)) for i in range(6)]
        self.log_image_grid(record["step"], "samples/ocr", tiles, columns=3, caption=f"ocr at {record['step']}")


def tracker_config(tiny_config, trackers, **extra):
    cfg = tiny_config(**{"logging.tensorboard": "null", "logging.trackers": f"[{', '.join(trackers)}]", **extra})
    cfg.tasks = [task for task in cfg.tasks if task.name == "ocr"]  # one task: a round in about a second
    return cfg


def test_a_run_mirrors_its_metrics_config_and_images_to_tensorboard_and_offline_wandb(
    tiny_config, tmp_path, monkeypatch, offline_wandb
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(trainer, "MetricsWriter", EvaluatingWriter)
    cfg = tracker_config(
        tiny_config, ["tensorboard", "wandb"], **{"logging.run_name": "tiny-ocr", "logging.wandb.tags": "[ci]"}
    )
    out = tmp_path / "run"
    trainer.Trainer.build(cfg, out, device="cpu").fit()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]  # metrics.jsonl: still the source of truth
    info = {"name": "tiny-ocr", "git_revision": git_revision(), "version": __version__}

    (run_folder,) = (out / "wandb").glob("offline-run-*")
    run, config, history = read_wandb_run(run_folder)
    assert run.display_name == "tiny-ocr" and list(run.tags) == ["ci"] and run.project == "opd-fast"
    assert run.run_id == (out / "wandb" / "run-id").read_text().strip()
    assert config["opd_fast"] == info
    for section, values in cfg.to_dict().items():
        assert config[section] == values, section
    assert sorted(history) == [1, 2]
    for line in lines:
        row = history[line["step"]]
        for key in ("loss", "loss/ocr", "grad_norm", "lr", "seconds", "nonfinite_rounds"):
            assert row[key] == pytest.approx(line[key]), key
        assert "skipped" not in row and "backend" not in row  # flags and names stay in metrics.jsonl
        assert row["samples/ocr/caption"] == f"ocr at {line['step']}"
        image = Image.open(run_folder / "files" / row["samples/ocr/path"])
        assert image.size == (24, 16) and image.getpixel((20, 12)) == (200, 55, 0)  # row 1, column 2: tile 5

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    for key in ("loss", "loss/ocr", "lr"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (line["step"], pytest.approx(line[key], rel=1e-6)) for line in lines
        ]
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    (config_text,) = texts["config/text_summary"]
    assert json.loads(config_text.tensor_proto.string_val[0].decode()) == cfg.to_dict()
    (run_text,) = texts["run/text_summary"]
    assert "- name: tiny-ocr" in run_text.tensor_proto.string_val[0].decode()
    images = events.Images("samples/ocr")
    assert [(e.step, e.width, e.height) for e in images] == [(1, 24, 16), (2, 24, 16)]
    assert [e.step for e in texts["samples/ocr/caption/text_summary"]] == [1, 2]


def test_a_resumed_run_continues_its_wandb_run(tiny_config, tmp_path, offline_wandb):
    cfg = tracker_config(tiny_config, ["wandb"])
    out = tmp_path / "run"
    trainer.Trainer.build(cfg, out, device="cpu").fit(until=1)
    trainer.Trainer.build(cfg, out, device="cpu", resume=True).fit()
    assert not (out / "tensorboard").exists()
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    runs = [read_wandb_run(folder) for folder in folders]
    assert runs[0][0].run_id == runs[1][0].run_id == (out / "wandb" / "run-id").read_text().strip()
    assert runs[0][0].display_name == "run"  # no logging.run_name: the output folder's name
    assert [sorted(history) for _, _, history in runs] == [[1], [2]]


def test_trackers_are_checked_when_the_config_loads(tiny_config):
    assert tiny_config(**{"logging.tensorboard": "null"}).logging.active_trackers() == ["tensorboard"]  # default
    assert tiny_config().logging.active_trackers() == []  # the older switch, false in the tests' config
    both = {"logging.trackers": "[wandb, tensorboard]", "logging.tensorboard": True}
    assert tiny_config(**both).logging.active_trackers() == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match=r"logging\.trackers: unknown tracker\(s\) 'mlflow' \(known: ") as e:
        tiny_config(**{"logging.tensorboard": "null", "logging.trackers": "[tensorboard, mlflow]"})
    assert all(name in str(e.value) for name in TRACKERS)
    assert sorted(TRACKER_NAMES) == sorted(TRACKERS)  # the config's list of names is the registry's
    with pytest.raises(ConfigError, match=r"logging\.tensorboard: false contradicts logging\.trackers"):
        tiny_config(**{"logging.trackers": "[tensorboard]"})  # the tests' config has logging.tensorboard: false
    with pytest.raises(ConfigError, match=r"logging\.tensorboard: true contradicts"):
        tiny_config(**{"logging.trackers": "[wandb]", "logging.tensorboard": True})
    with pytest.raises(ConfigError, match="listed twice"):
        tiny_config(**{"logging.tensorboard": "null", "logging.trackers": "[wandb, wandb]"})
    with pytest.raises(ConfigError, match=r"logging\.wandb\.project: only the wandb tracker reads it"):
        tiny_config(**{"logging.wandb.project": "p"})
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode: must be one of"):
        tiny_config(**{"logging.tensorboard": "null", "logging.trackers": "[wandb]", "logging.wandb.mode": "online!"})
    with pytest.raises(ConfigError, match=r"logging\.trackers: expected a list"):
        tiny_config(**{"logging.trackers": "wandb"})
    with pytest.raises(ConfigError, match=r"unknown config key logging\.wandb\.dir"):
        tiny_config(**{"logging.wandb.dir": "/tmp"})


def test_a_missing_tracker_package_fails_before_any_tracker_opens(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(WandbTracker, "requires", ("opd_fast_no_such_package",))
    cfg = tracker_config(tiny_config, ["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match=r"wandb needs the Python package\(s\) .*pip install 'opd-fast\[wandb\]'"):
        check_trackers(cfg.logging)
    with pytest.raises(ConfigError, match="needs the Python package"):
        MetricsWriter.for_run(cfg, tmp_path)
    assert not (tmp_path / "tensorboard").exists()


def test_a_tracker_that_fails_to_open_closes_the_ones_before_it(tiny_config, tmp_path, monkeypatch, offline_wandb):
    closed = []
    monkeypatch.setattr(TRACKERS["tensorboard"], "close", lambda self: closed.append(self.writer.close()))

    def refuse(**kwargs):
        raise offline_wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(offline_wandb, "init", refuse)
    with pytest.raises(ConfigError, match=r"wandb could not start its run: api_key not configured .*mode: offline"):
        MetricsWriter.for_run(tracker_config(tiny_config, ["tensorboard", "wandb"]), tmp_path)
    assert closed == [None]


def test_image_grid_puts_image_i_at_row_i_div_columns_and_column_i_mod_columns():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    tiles = [Image.new("RGB", (4, 3), color) for color in colors]
    tiles[1] = Image.new("RGB", (2, 2), colors[1])  # smaller: top-left of its cell, the rest background
    grid = image_grid(tiles, columns=3)
    assert grid.size == (12, 6)
    for i, color in enumerate(colors):
        row, column = divmod(i, 3)
        assert grid.getpixel((column * 4, row * 3)) == color
    assert grid.getpixel((4 + 3, 2)) == (255, 255, 255)  # outside the small tile
    assert grid.getpixel((11, 5)) == (255, 255, 255)  # the last row's empty cell
    with pytest.raises(ValueError, match="no images"):
        image_grid([], columns=2)


def test_metrics_writer_logs_image_lists_and_grids_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, tensorboard=True)
    tiles = [Image.new("RGB", (5, 4), (i * 60, 0, 0)) for i in range(4)]
    writer.log_images(3, {"row": tiles[:3], "one": tiles[3]})
    grid = writer.log_image_grid(3, "grid", tiles, columns=2, caption="2 x 2")
    writer.close()
    assert grid.size == (10, 8)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {tag: [(e.step, e.width, e.height) for e in events.Images(tag)] for tag in ("row", "one", "grid")} == {
        "row": [(3, 15, 4)],
        "one": [(3, 5, 4)],
        "grid": [(3, 10, 8)],
    }
    (caption,) = events.Tensors("grid/caption/text_summary")
    assert caption.tensor_proto.string_val[0] == b"2 x 2"


def test_git_revision_is_none_outside_a_repository_or_without_git(tmp_path, monkeypatch):
    assert git_revision(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary
    assert git_revision() is None


def test_the_logging_section_round_trips_through_run_json(tiny_config):
    from opd_fast.config import config_from_dict

    cfg = tiny_config(**{"logging.tensorboard": "null", "logging.trackers": "[wandb]", "logging.wandb.mode": "offline"})
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.logging == cfg.logging and again.logging.active_trackers() == ["wandb"]
    assert LoggingConfig(tensorboard=False).active_trackers() == []
