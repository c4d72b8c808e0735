"""The student update engines side by side: time per optimizer step and peak memory.

    python bench/bench_engine.py                       # CPU, tiny-sd3, 2 ranks: LoRA and full-parameter students
    python bench/bench_engine.py --preset sd3.5-medium --full --world 1 --bf16 --resolution 512 \\
        --variants zero3,zero3-offload-optimizer,zero3-offload-all          # one GPU (each rank takes one)
    python bench/bench_engine.py --preset sd3.5-medium --layers 2 --full --world 1 --num-steps 2 --batch 1 \
        --tokens 333 --steps 1 --variants zero3,zero3-offload-optimizer,zero3-offload-all   # its code path on a CPU

One optimizer step is what the engine does in a round: `backwards` backward calls (trained steps x tasks x
micro-batches: 9 x 3 = 27 for the official schedule) of the student's forward through engine.forward_model (as the
trainer calls it, with the student's CFG), then engine.step(). Teachers, rollout bookkeeping and the fused loss are
left out: they cost the same under every engine, and this is about what the engines add. The loss is the ODE L2
(0.5 ||v_S - target||^2, target fixed per call).

Each variant runs in fresh processes (one per rank, the environment torchrun would give them), so peak memory is
the variant's own: the largest over ranks of the peak RSS (resource.getrusage; "over base" subtracts the
high-water mark before the engine was built) on CPU, torch.cuda.max_memory_allocated on CUDA. Time: the median over
`--steps` timed steps after one warm-up step, from rank 0. On a shared machine, --repeat N runs the variant list N
times interleaved and reports the median of the N medians and the least minimum (noise only adds time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {  # name -> (world size or None for --world, config overrides)
    "single": (1, ["engine.kind=single"]),
    "ddp": (None, ["engine.kind=ddp"]),
    "zero0": (None, ["engine.kind=deepspeed", "engine.zero_stage=0"]),
    "zero1": (None, ["engine.kind=deepspeed", "engine.zero_stage=1"]),
    "zero2": (None, ["engine.kind=deepspeed", "engine.zero_stage=2"]),
    "zero3": (None, ["engine.kind=deepspeed", "engine.zero_stage=3"]),
    "zero3-offload-optimizer": (None, ["engine.kind=deepspeed", "engine.zero_stage=3", "engine.offload=optimizer"]),
    "zero3-offload-all": (None, ["engine.kind=deepspeed", "engine.zero_stage=3", "engine.offload=all"]),
}
CPU_DEFAULT = "single,ddp,zero0,zero1,zero2,zero3"


def high_water_mb() -> float:
    """Peak RSS of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one rank ----------------------------------------------------------------------------------------------------------
def worker(args) -> None:
    import torch
    from common import build_random_transformer

    from opd_fast import distributed, models
    from opd_fast.config import load_config
    from opd_fast.engine import backwards_per_round, make_engine
    from opd_fast.families import preset_arch

    overrides = [
        *VARIANTS[args.variant][1],
        f"model.preset={args.preset}",
        f"sampling.num_steps={args.num_steps}",
        f"sampling.resolution={args.resolution}",
        f"train.micro_batch_size={args.batch}",
        f"student.lora.enabled={'false' if args.full else 'true'}",
        f"student.lora.rank={args.lora_rank}",
    ]
    if args.bf16 and "engine.kind=deepspeed" in overrides:
        overrides.append("engine.bf16=true")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    info = distributed.setup(cfg.engine)
    if info.device.type == "cpu":
        torch.set_num_threads(args.threads)
    family, _ = preset_arch(args.preset)
    model = build_random_transformer(args.preset, info.device, torch.float32, layers=args.layers)  # frozen
    models.add_student_lora(model, cfg.student.lora)
    if args.bf16 and cfg.engine.kind != "deepspeed":
        model.to(torch.bfloat16)  # the other engines have no master copy: bf16 weights, as DeepSpeed computes
    model.train()
    base_mb = high_water_mb()
    engine = make_engine(cfg, model, info)
    backwards = backwards_per_round(cfg)

    g = torch.Generator().manual_seed(info.rank)
    shape = family.latent_shape(model, args.batch, args.resolution)
    dim, pooled, tokens = model.config.joint_attention_dim, model.config.pooled_projection_dim, args.tokens
    cond = models.Conditioning(
        *(
            torch.randn(*s, generator=g).to(info.device)
            for s in [(args.batch, tokens, dim), (args.batch, pooled), (1, tokens, dim), (1, pooled)]
        )
    )
    x = torch.randn(shape, generator=g).to(info.device)
    target = torch.randn(shape, generator=g).to(info.device)
    sigma = torch.full((args.batch,), 0.7, device=info.device)

    def one_step() -> None:
        for _ in range(backwards):
            v, w = family.velocity(engine.forward_model, x, sigma, cond, 4.5)
            if w is not None:  # CFG: [uncond; cond]
                v_u, v_c = v.float().chunk(2)
                v = v_u + w * (v_c - v_u)
            engine.backward(0.5 * (v.float() - target).square().sum() / (backwards * args.batch))
        engine.step()

    def sync() -> None:
        if info.device.type == "cuda":
            torch.cuda.synchronize()

    one_step()  # warm-up: allocations, DeepSpeed's lazy state, kernel selection
    sync()
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {
        "rank": info.rank,
        "step_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mb": high_water_mb(),
        "rss_over_base_mb": high_water_mb() - base_mb,
        "cuda_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else None,
        "backwards": backwards,
    }
    Path(args.result).with_suffix(f".rank{info.rank}.json").write_text(json.dumps(result))
    distributed.finish(0)  # not a plain return: see distributed.finish


# -- the coordinator -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(args, variant: str, scratch: Path) -> dict:
    world = VARIANTS[variant][0] or args.world
    port, result = str(free_port()), scratch / variant
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": str(args.threads),
        }
        cmd = [sys.executable, __file__, "--worker", variant, "--result", str(result), *args.passthrough]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{variant} failed:\n" + "\n".join(e[-3000:] for e in errors))
    ranks = [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(world)]
    return {
        "variant": variant,
        "world": world,
        "step_s": ranks[0]["step_s"],
        "min_s": ranks[0]["min_s"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "rss_over_base_mb": max(r["rss_over_base_mb"] for r in ranks),
        "cuda_peak_gb": max(r["cuda_peak_gb"] or 0 for r in ranks) or None,
        "backwards": ranks[0]["backwards"],
    }


def merge(repeats: list[dict]) -> dict:
    """One variant's repeated runs: the median of their medians, the least minimum, the largest memory."""
    row = dict(repeats[0])
    row["step_s"] = statistics.median(r["step_s"] for r in repeats)
    row["min_s"] = min(r["min_s"] for r in repeats)
    for key in ("peak_rss_mb", "rss_over_base_mb"):
        row[key] = max(r[key] for r in repeats)
    row["repeats"] = len(repeats)
    return row


def table(rows: list[dict], title: str) -> str:
    single = next((r for r in rows if r["variant"] == "single"), None)
    header = (
        "| variant | ranks | median s/step | min s/step | x single (median) | peak RSS MB (max over ranks) | "
        "RSS over base MB | x single | CUDA peak GB |"
    )
    lines = [f"**{title}**", "", header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['step_s'] / single['step_s']:.2f}" if single else ""
        mem = f"{r['rss_over_base_mb'] / single['rss_over_base_mb']:.2f}" if single else ""
        cuda = f"{r['cuda_peak_gb']:.2f}" if r["cuda_peak_gb"] else ""
        lines.append(
            f"| {r['variant']} | {r['world']} | {r['step_s']:.3f} | {r['min_s']:.3f} | {speed} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_over_base_mb']:.0f} | {mem} | {cuda} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma list of {', '.join(VARIANTS)} (CPU default: "
        f"{CPU_DEFAULT}; then the same for a full-parameter student unless --lora-only)",
    )
    parser.add_argument("--world", type=int, default=2, help="ranks of the multi-process variants")
    parser.add_argument("--preset", default="tiny-sd3")
    parser.add_argument("--layers", type=int, default=None, help="keep only this many blocks (widths unchanged)")
    parser.add_argument("--full", action="store_true", help="full-parameter student only (default: LoRA, then full)")
    parser.add_argument("--lora-only", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=4, help="sampling steps: backward calls = int(0.99 n) x 3")
    parser.add_argument("--batch", type=int, default=2, help="prompts per micro-batch (CFG doubles it)")
    parser.add_argument("--tokens", type=int, default=16, help="text tokens (SD3.5: 333 = 77 CLIP + 256 T5)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 2),
        help="CPU threads per process, the same for every variant (default: cores / 2), so the single "
        "process does one rank's work with one rank's share of the machine",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run the variant list this many times, interleaved")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        worker(args)
        return
    common = [
        "--preset",
        args.preset,
        "--resolution",
        str(args.resolution),
        "--num-steps",
        str(args.num_steps),
        "--batch",
        str(args.batch),
        "--tokens",
        str(args.tokens),
        "--lora-rank",
        str(args.lora_rank),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ] + (["--bf16"] if args.bf16 else [])
    common += ["--layers", str(args.layers)] if args.layers else []
    variants = (args.variants or CPU_DEFAULT).split(",")
    students = [True] if args.full else [False] if args.lora_only or args.variants else [False, True]
    import torch

    print(
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for full in students:
            args.passthrough = common + (["--full"] if full else [])
            runs = [[run_variant(args, v, Path(scratch)) for v in variants] for _ in range(args.repeat)]
            block = [merge([rep[i] for rep in runs]) for i in range(len(variants))]
            for r in block:
                r["student"] = "full" if full else f"LoRA r{args.lora_rank}"
            rows += block
            print(
                table(
                    block,
                    f"{args.preset}, {'full-parameter' if full else f'LoRA r{args.lora_rank}'} student, "
                    f"{block[0]['backwards']} backward calls per step",
                ),
                flush=True,
            )
            print()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
