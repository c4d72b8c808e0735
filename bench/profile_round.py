"""One training round under torch.profiler, with the round's phases (opd_fast.profiling's ranges) in the trace.

    python bench/profile_round.py --preset sd3.5-medium --device cuda --resolution 512 --out runs/gpu/trace
    python bench/profile_round.py --warmup 0 --out /tmp/trace          # tiny-sd3 on the CPU: the same code, seconds

For machines where Nsight Systems cannot run: opd_fast.profiling opens a torch.profiler.record_function range for
every NVTX range while a torch profiler records, so the phases (task:<name>, teacher, student_forward, loss,
backward, optimizer) show in the chrome trace and in key_averages. A Trainer is built from a config dict (random
weights of the preset, random LoRA teachers from bench/bench_round.py's scratch world; the ladder's fastest
settings: one-pass, fused opd_step, merged teachers, FP8 and a side stream and cuDNN attention on CUDA), trained
for --warmup rounds, then one round is profiled.

Writes OUT/profile.md (the phase table: calls, CPU and device time; the top ops by device time) and
OUT/trace.json.gz (the chrome trace, for chrome://tracing or ui.perfetto.dev; --trace light, the default, keeps the
device timeline and the phase ranges, small enough to bring back). Exits 1 if a phase is missing from the profile.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import TASKS, write_world

from opd_fast.config import config_from_dict
from opd_fast.families import PRESETS, preset_arch
from opd_fast.trainer import Trainer

EXPECTED = ("teacher", "student_forward", "loss", "backward", "optimizer")  # one-pass: no "rollout"


def make_config(args, tasks: list[dict], cache_dir: Path):
    cuda = torch.device(args.device).type == "cuda"
    large = not args.preset.startswith("tiny")
    family, _ = preset_arch(args.preset)
    return config_from_dict(
        {
            "model": {
                "family": family.name,
                "preset": args.preset,
                "dtype": args.dtype,
                "attention": "cudnn" if cuda else "sdpa",
            },
            "student": {"guidance": 4.5, "lora": {"rank": 32, "alpha": 64} if large else {"rank": 8, "alpha": 16}},
            "tasks": tasks,
            "teacher_runtime": {"precision": args.precision, "stream": "side" if cuda else "serial", "mode": "merged"},
            "prompts": {"max_tokens": family.text_tokens() if large else 16, "cache_dir": str(cache_dir)},
            "sampling": {"num_steps": 10, "timestep_fraction": 0.99, "resolution": args.resolution},
            "loss": {"backend": "auto"},
            "train": {"rounds": 1000, "micro_batch_size": args.prompts, "schedule": "one_pass"},
            "logging": {"progress": False, "tensorboard": False},
        }
    )


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_us(event) -> float:
    """Device microseconds of a key_averages row (the attribute was renamed from cuda_* to device_* in torch 2.4)."""
    return float(getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) or 0.0)


def self_device_us(event) -> float:
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) or 0.0)


def phase_table(averages) -> tuple[str, set[str]]:
    """Markdown rows of the phase ranges (and the task ranges) found in the profile, and the phase names seen."""
    names = set(EXPECTED) | {"rollout", "rollout/student_forward", "rollout/loss"}
    rows = [e for e in averages if e.key in names or e.key.startswith("task:")]
    lines = ["| range | where | calls | CPU ms (total) | device ms (total) |", "|---|---|---:|---:|---:|"]
    for e in sorted(rows, key=lambda e: -e.cpu_time_total):
        where = str(getattr(e, "device_type", "")).removeprefix("DeviceType.")
        lines.append(f"| {e.key} | {where} | {e.count} | {e.cpu_time_total / 1e3:.2f} | {device_us(e) / 1e3:.2f} |")
    return "\n".join(lines), {e.key for e in rows}


def top_ops(averages, cuda: bool, limit: int = 25) -> str:
    """The ops (kernels on CUDA) that took the most self time."""
    key = self_device_us if cuda else (lambda e: e.self_cpu_time_total)
    lines = ["| op | calls | self ms | share |", "|---|---:|---:|---:|"]
    total = sum(key(e) for e in averages) or 1.0
    for e in sorted(averages, key=key, reverse=True)[:limit]:
        lines.append(f"| {e.key[:90]} | {e.count} | {key(e) / 1e3:.2f} | {100 * key(e) / total:.1f}% |")
    return "\n".join(lines)


# What a "light" trace keeps: the device timeline and the phase ranges. A full SD3.5-M round also has ~250k CPU op
# and ~250k launch events, which make the file too large to bring back from a machine that returns 16 MiB a file.
LIGHT = {"kernel", "gpu_memcpy", "gpu_memset", "user_annotation", "gpu_user_annotation", "Trace"}
TRACE_LIMIT = 15 << 20


def write_trace(trace: Path, dest: Path, mode: str) -> str:
    """Gzip the chrome trace to dest; "light" keeps LIGHT's categories (and the metadata rows), and if that is still
    over TRACE_LIMIT, only the first task's range. Returns what was kept."""
    if mode == "full":
        with open(trace, "rb") as src, gzip.open(dest, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        return "everything"
    data = json.loads(trace.read_text())
    events = [e for e in data["traceEvents"] if e.get("ph") == "M" or e.get("cat") in LIGHT]
    kept = f"device activity and phase ranges ({len(events)} of {len(data['traceEvents'])} events)"
    data["traceEvents"] = events
    dest.write_bytes(gzip.compress(json.dumps(data).encode(), compresslevel=6))
    if dest.stat().st_size > TRACE_LIMIT:
        first = min(
            (e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("task:")),
            key=lambda e: e["ts"],
            default=None,
        )
        if first is not None:
            end = first["ts"] + first["dur"]
            data["traceEvents"] = [e for e in events if e.get("ph") == "M" or e.get("ts", 0) <= end]
            kept += f"; only the first task ({first['name']}): the whole round was {dest.stat().st_size >> 20} MiB"
            dest.write_bytes(gzip.compress(json.dumps(data).encode(), compresslevel=6))
    return kept


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-sd3", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 tiny, 512 otherwise)")
    ap.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--precision", default=None, help="teachers' precision (default: fp8 on CUDA, model on CPU)")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per task (one micro-batch)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds before the profiled one")
    ap.add_argument("--trace", choices=["light", "full"], default="light", help="light: device timeline and phases")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.resolution = args.resolution or (64 if args.preset.startswith("tiny") else 512)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.precision = args.precision or ("fp8" if cuda else "model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    large = not args.preset.startswith("tiny")

    t0 = time.perf_counter()
    family, kwargs = preset_arch(args.preset)
    with torch.device("meta"):  # only the names and shapes of the LoRA targets, for the random teachers
        shapes = family.transformer_class(**kwargs)
    with tempfile.TemporaryDirectory(prefix="profile_round_") as tmp:
        scratch = Path(tmp)
        tasks = write_world(
            scratch / "world",
            shapes,
            rank=32 if large else 4,
            alpha=64 if large else 8,
            prompts=args.prompts,
            lora_targets=family.lora_targets,
        )
        trainer = Trainer.build(make_config(args, tasks, scratch / "embeddings"), scratch / "run", device=args.device)
        built = time.perf_counter() - t0
        for _ in range(args.warmup):
            trainer.train_round()
        sync(args.device)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        t1 = time.perf_counter()
        with torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False) as prof:
            result = trainer.train_round()
            sync(args.device)
        round_s = time.perf_counter() - t1
        trace = scratch / "trace.json"
        prof.export_chrome_trace(str(trace))
        kept = write_trace(trace, out / "trace.json.gz", args.trace)
    averages = prof.key_averages()
    phases, seen = phase_table(averages)
    missing = [p for p in EXPECTED if p not in seen]
    machine = torch.cuda.get_device_name() if cuda else "CPU"
    header = (
        f"{args.preset} @ {args.resolution} px, {args.dtype}, teachers {args.precision}, {len(TASKS)} tasks x "
        f"{args.prompts} prompts, {machine} (torch {torch.__version__}): round {trainer.round - 1} profiled in "
        f"{round_s:.2f} s (profiler on), loss {result.loss:.6g}; built in {built:.0f} s, {args.warmup} warm-up "
        "round(s)"
    )
    note = (
        "Phase ranges (record_function, opened by opd_fast.profiling while the profiler records; a range's device "
        "time is that of the kernels launched inside it):"
    )
    size = (out / "trace.json.gz").stat().st_size / 2**20
    text = "\n".join(
        [
            header,
            "",
            note,
            "",
            phases,
            "",
            f"Top ops by self {'device' if cuda else 'CPU'} time:",
            "",
            top_ops(averages, cuda),
            "",
            f"trace: trace.json.gz ({size:.1f} MiB; {kept})",
        ]
        + ([f"\nMISSING phases: {', '.join(missing)}"] if missing else [])
    )
    (out / "profile.md").write_text(text + "\n")
    print(text)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
