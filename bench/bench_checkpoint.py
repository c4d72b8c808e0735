"""What a checkpoint's proof costs: save_checkpoint with its manifest (every file's sha256) against the same write
without one, and the verification a resume does against reading the files.

    python bench/bench_checkpoint.py                       # 512 MiB of tensors in OUT's filesystem, 3 repeats
    python bench/bench_checkpoint.py --mib 4096 --dir /scratch/x --repeat 5

A checkpoint is what the trainer saves, here random float32 tensors of --mib MiB in all, split as a LoRA student's
are: the student 1/4, the optimizer (Adam's two moments) 1/2, the EMA 1/4, plus state.json. Each repeat runs both variants back to back on fresh folders (A B A B) and
syncs them to the disk as save_checkpoint does; the ratio is per repeat, so a shared machine's noise cancels.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from opd_fast import checkpoint


def _plain_save(out: Path, groups: dict[str, dict[str, torch.Tensor]]) -> None:
    """The write without a manifest: the same files, synced."""
    folder = out / "checkpoints" / "plain"
    folder.mkdir(parents=True)
    for name, group in groups.items():
        save_file(group, str(folder / f"{name}.safetensors"))
    (folder / "state.json").write_text("{}")
    for f in [*folder.iterdir(), folder]:
        checkpoint._fsync(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quarter = args.mib * (1 << 20) // 16
    groups = {
        "student": {"w": torch.randn(quarter)},
        "optimizer": {"exp_avg": torch.randn(quarter), "exp_avg_sq": torch.rand(quarter)},
        "ema": {"w": torch.randn(quarter)},
    }
    identity = {"run_id": "bench", "config_hash": "bench"}
    rows = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            t0 = time.perf_counter()
            _plain_save(Path(tmp) / "a", groups)
            t1 = time.perf_counter()
            path = checkpoint.save_checkpoint(Path(tmp) / "b", 1, groups, {}, 1, identity=identity)
            t2 = time.perf_counter()
            checkpoint.verify_checkpoint(path, identity, tuple(groups))
            t3 = time.perf_counter()
            for name in groups:  # (load_file maps the file; the sums read every byte, as a resume's copies do)
                sum(float(t.sum()) for t in load_file(str(path / f"{name}.safetensors")).values())
            t4 = time.perf_counter()
            shutil.rmtree(path)
        rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
    print(f"{args.mib} MiB, {args.repeat} repeats, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| repeat | plain save s | save + manifest s | ratio | verify s | load s | verify/load |")
    print("|---|---|---|---|---|---|---|")
    for i, (plain, proved, verify, load) in enumerate(rows):
        print(
            f"| {i} | {plain:.2f} | {proved:.2f} | {proved / plain:.2f} | {verify:.2f} | {load:.2f} | {verify / load:.2f} |"
        )
    ratios = [p / a for a, p, _, _ in rows]
    gib = args.mib / 1024
    print(
        f"median save ratio {statistics.median(ratios):.2f}; sha256 at "
        f"{gib / statistics.median(r[2] for r in rows):.2f} GiB/s (verify)"
    )


if __name__ == "__main__":
    main()
