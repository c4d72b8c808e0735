"""One OPD round (3 tasks), end to end, from the official-like schedule to ours, one optimisation at a time.

    python bench/bench_round.py                                   # tiny-sd3 on CPU, 64 px (about two minutes)
    python bench/bench_round.py --preset sd3.5-medium --device cuda --resolution 512
    python bench/bench_round.py --preset sd3.5-medium --device cuda --resolution 1024 --variants official,fp8,side
    python bench/bench_round.py --preset sd3.5-medium --layers 2 --resolution 64 --prompts 1 --rounds 1 --warmup 0
                                  # the released widths, 2 blocks: the GPU command's code path, checked on a CPU

Each variant is a real opd_fast.trainer.Trainer round (SPEC defaults: 10 steps, 9 trained, student CFG 4.5,
teachers' CFG 1.0 / 4.5 / 4.5, 3 prompts per task, student LoRA r32 on large presets), on a random-weight base and
random LoRA teachers (peft layout, official targets) written to a scratch folder. The ladder is cumulative:

    official   two-pass (rollout, then recompute with grad), teachers as adapter swaps on the student (as the released
               code: set_adapter(teacher) / forward / set_adapter(student)), loss.backend reference
    one_pass   + one-pass rollout-train          fused    + fused opd_step (loss.backend auto)
    merged     + frozen merged teacher copies     fp8      + FP8 teachers (opd_fast.fp8, backend auto, rowwise)
    side       + teacher on a side CUDA stream    cudnn    + model.attention cudnn (cuDNN first in SDPA's order)
    task_batch + train.task_batching: the three tasks' micro-batches as one student batch per step
    compile    + torch.compile of every transformer block (student and teachers)
    adapter    alternative to merged at the fp8+side state: one shared FP8 base + unmerged LoRA adapters
    flash      alternative to cudnn: model.attention flash (the flash-attn package, where it imports)
    graphs     alternative at the task_batch state: teacher forwards replayed as CUDA graphs

A 16-bit base trains its fp32 LoRA under autocast in every row, the official-like one included (the released code
autocasts its forward to fp16): the rows differ by schedule, not by the student's precision.

Reported per variant, from the fastest of its timed rounds: images/s (tasks x prompts per round / round time),
seconds per phase (opd_fast.profiling PhaseTimer: CUDA events on the stream running the phase, so side-stream
teacher time overlaps others; CPU: perf_counter) and their sum over the wall time (table() says how to read it),
peak device memory, teacher weight memory, and MFU = FLOPs of one
round / (round time x the measured matmul ceiling), and the loss of round 0 (the same student, prompts and noise in
every variant) against the official-like one: the optimisations must keep it (verdict() states the tolerance), with
the cosine of the round-0 student gradient with the official-like one's (FP8 teachers' effect on training).
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the real device: one student forward + backward
and one forward of each task's teacher at batch 3 with their CFG, times the 9 trained steps; the same useful work
for every variant (the official-like rollout's recompute is not counted as useful). The ceiling is a square bf16
torch.matmul (8192) on CUDA, float32 (1024) on CPU where the tiny model runs float32. The teacher weight memory of
each runtime mode is printed from the architecture's shapes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import TASKS, build_random_transformer, write_world
from torch.utils.flop_counter import FlopCounterMode

from opd_fast import attention, distributed
from opd_fast.config import config_from_dict
from opd_fast.families import PRESETS, preset_arch
from opd_fast.hooks import Hook
from opd_fast.models import student_forward_context
from opd_fast.profiling import PHASES, PhaseTimer
from opd_fast.run import build_run
from opd_fast.teachers import Teacher, add_lora_adapter, read_peft_lora, teacher_memory_bytes
from opd_fast.trainer import Trainer

START = {
    "schedule": "two_pass",
    "backend": "reference",
    "teachers": "swap",
    "precision": "model",
    "stream": "serial",
    "attention": "sdpa",
    "task_batching": False,
    "cuda_graphs": False,
    "compile": False,
}
LADDER = [
    ("official", "official-like", {}),
    ("one_pass", "+ one-pass", {"schedule": "one_pass"}),
    ("fused", "+ fused opd_step", {"backend": "auto"}),
    ("merged", "+ merged teacher copies", {"teachers": "merged"}),
    ("fp8", "+ FP8 teachers", {"precision": "fp8"}),
    ("side", "+ side stream", {"stream": "side"}),
    ("cudnn", "+ cuDNN attention", {"attention": "cudnn"}),
    ("task_batch", "+ cross-task student batch", {"task_batching": True}),
    ("compile", "+ torch.compile", {"compile": True}),
]
ALTERNATIVES = [
    ("adapter", "alt: adapter-mode FP8 teachers (at side)", "side", {"teachers": "adapter"}),
    ("flash", "alt: flash-attn attention (at cudnn)", "cudnn", {"attention": "flash"}),
    ("graphs", "alt: CUDA-graph teachers (at task_batch)", "task_batch", {"cuda_graphs": True}),
]
CUDA_ONLY = {
    "side": "no CUDA stream on CPU (runs serially: same as the row above)",
    "cudnn": "cuDNN attention is a CUDA backend",
    "graphs": "CUDA graphs need a CUDA device",
}


class StudentSwapTeacher(Teacher):
    """The released code's teacher: its LoRA is another adapter on the student, swapped in for the forward and
    swapped back out (diffusers set_adapter, which also flips requires_grad, as theirs does)."""

    def velocity(self, family, x, sigma, cond):
        self.model.set_adapter(self.adapter)
        try:
            with torch.no_grad():
                return family.velocity(self.model, x, sigma, cond, self.guidance)
        finally:
            self.model.set_adapter("default")


# ---------------------------------------------------------------------------------------------------------------
# the scratch world: prompts and random LoRA teachers


def make_config(args, tasks: list[dict], state: dict, cache_dir: Path):
    large = not args.preset.startswith("tiny")
    family, _ = preset_arch(args.preset)
    targets = list(family.lora_targets)  # the family's attention projections (Wan: attn1 / attn2, Z-Image: attention)
    return config_from_dict(
        {
            "model": {
                "family": family.name,
                "preset": args.preset,
                "dtype": args.dtype,
                "attention": state["attention"],
            },
            "student": {
                "guidance": 4.5,
                "lora": {**({"rank": 32, "alpha": 64} if large else {"rank": 8, "alpha": 16}), "targets": targets},
            },
            "tasks": tasks,
            "teacher_runtime": {
                "precision": state["precision"],
                "stream": state["stream"],
                "mode": "adapter" if state["teachers"] == "adapter" else "merged",
                "cuda_graphs": state["cuda_graphs"],
            },
            "prompts": {"max_tokens": family.text_tokens() if large else 16, "cache_dir": str(cache_dir)},
            "sampling": {"num_steps": 10, "timestep_fraction": 0.99, "resolution": args.resolution},
            "loss": {"backend": state["backend"]},
            "train": {
                "rounds": 1000,
                "micro_batch_size": args.prompts,
                "schedule": state["schedule"],
                "task_batching": state["task_batching"],
            },
            "logging": {"progress": False, "tensorboard": False},
        }
    )


class RoundZero(Hook):
    """The trainer's round 0 (the same student, prompts and noise in every variant): its flattened student gradient
    before clipping, and its loss (timed_round sets it). Their agreement with the official-like variant's shows what
    an optimisation (FP8 teachers above all) does to training."""

    def __init__(self):
        self.grad: torch.Tensor | None = None
        self.loss: float | None = None

    def after_gradients(self, trainer, round_idx):
        if round_idx == 0:
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)) for p in trainer.engine.params]
            self.grad = torch.cat([g.detach().float().flatten().cpu() for g in grads])


def build_trainer(args, tasks, state, scratch: Path, index: int, pristine) -> tuple[Trainer, RoundZero]:
    cfg = make_config(args, tasks, state, scratch / "embeddings")
    out = scratch / f"run{index}"
    swap = state["teachers"] == "swap"
    # A copy of the one random base instead of initialising billions of parameters again for every variant; the
    # official-like teachers are adapters on the student itself, attached once the student exists.
    parts = build_run(
        cfg,
        out,
        distributed.setup(cfg.engine, args.device),
        base=copy.deepcopy(pristine),
        teachers={} if swap else None,
    )
    if swap:
        parts.teachers = {}
        for task in cfg.tasks:
            lora = read_peft_lora(Path(task.teacher.path), task.name)
            add_lora_adapter(parts.student, task.name, lora, task.name)
            parts.teachers[task.name] = StudentSwapTeacher(
                task.name, parts.student, task.teacher.guidance, adapter=task.name
            )
        parts.student.set_adapter("default")  # add_lora_adapter froze everything; the student trains again
    if state["compile"]:
        models = {id(m): m for m in [parts.student] + [t.model for t in parts.teachers.values()]}
        for model in models.values():
            for block in model.transformer_blocks:
                block.compile()
    round_zero = RoundZero()
    return Trainer(cfg, parts, out, hooks=[round_zero], timer=PhaseTimer(args.device)), round_zero


# ---------------------------------------------------------------------------------------------------------------
# measurements


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device: str, reps: int = 5, batches: int = 5) -> tuple[float, str]:
    """FLOP/s of a square matmul in the dtype the benchmark's GEMMs run in (bf16 on CUDA, float32 on CPU): the
    fastest of `batches` timed batches, since on a shared machine any other load only ever slows a batch down."""
    cuda = torch.device(device).type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(batches):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best, f"{str(dtype).removeprefix('torch.')} matmul {n}^3"


def count_round_flops(trainer) -> float:
    """FLOPs of one round's useful work: per trained step and task, one student forward + backward and one teacher
    forward, each at the micro-batch with its CFG (counted once per task, times its trained steps and micro-batches)."""
    cfg, device = trainer.cfg, trainer.device
    mb, family = cfg.train.micro_batch_size, trainer.family
    x = torch.randn(family.latent_shape(trainer.student, mb, cfg.sampling.resolution), device=device)
    sigma = trainer.sigmas[1].expand(mb).to(device)
    total = 0.0
    for task in cfg.tasks:
        cond = trainer.prompts[task.name].conditioning(torch.arange(mb), device)
        with FlopCounterMode(display=False) as counter:
            with student_forward_context(trainer.student, trainer.student_autocast):
                v, _ = family.velocity(trainer.student, x, sigma, cond, cfg.student.guidance)
            v.float().square().mean().backward()
            trainer.teachers[task.name].velocity(family, x, sigma, cond)
        total += counter.get_total_flops() * trainer.num_trained[task.name]
    trainer.engine.zero_grad()
    return total * cfg.train.micro_batches_per_task


def timed_round(trainer, args, round_zero: RoundZero) -> tuple[float, dict[str, float]]:
    """Wall seconds of one round (device synchronised before and after) and its seconds per phase; round 0's loss
    goes to round_zero."""
    trainer.phase_timer.read()
    sync(args.device)
    t0 = time.perf_counter()
    first = trainer.round == 0
    result = trainer.train_round()
    sync(args.device)
    seconds = time.perf_counter() - t0
    if first:
        round_zero.loss = result.loss
    return seconds, trainer.phase_timer.read()


def warm_up(trainer, args, round_zero: RoundZero) -> None:
    for _ in range(args.warmup):
        timed_round(trainer, args, round_zero)
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def summarize(
    trainer, round_zero: RoundZero, rounds: list[tuple[float, dict]], args, state: dict, reference_grad
) -> dict:
    """The fastest round (the least disturbed by anything else on the machine), its phases, the round-0 loss and the
    cosine of the round-0 gradient with `reference_grad` (the official-like variant's; None before it ran)."""
    seconds, phases = min(rounds, key=lambda r: r[0])
    grad = round_zero.grad
    cos = (
        None
        if reference_grad is None
        else float(grad.double() @ reference_grad.double() / (grad.double().norm() * reference_grad.double().norm()))
    )
    cuda = torch.device(args.device).type == "cuda"
    return {
        "round_s": seconds,
        "images_per_s": len(trainer.cfg.tasks) * args.prompts / seconds,
        "phases_s": {p: phases.get(p, 0.0) for p in PHASES},
        "rounds_s": [r[0] for r in rounds],
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "teacher_mb": teacher_bytes(trainer) / 2**20,
        "backend": trainer.backend,
        "loss0": round_zero.loss,
        "grad_cos": cos,
        "precision": state["precision"],
    }


def teacher_bytes(trainer) -> int:
    """Weights the teachers add: their own copies, or for swap teachers only their adapters on the student."""
    if not isinstance(next(iter(trainer.teachers.values())), StudentSwapTeacher):
        return teacher_memory_bytes(trainer.teachers)
    names = [f".{task}." for task in trainer.teachers]
    return sum(p.nbytes for n, p in trainer.student.named_parameters() if any(t in n for t in names))


def teacher_memory_by_mode(
    preset: str, layers: int | None, dtype: torch.dtype, teachers: int = 3, rank: int = 32
) -> str:
    """Teacher weight memory of each runtime mode, from the architecture's shapes (meta device, nothing allocated):
    merged = one copy per teacher; adapter = one shared base + a LoRA (the family's targets) per teacher; fp8 = the
    linears opd_fast.fp8 quantizes at 1 byte per weight, the rest in `dtype`."""
    from opd_fast import fp8

    family, kwargs = preset_arch(preset, layers)
    with torch.device("meta"):
        model = family.transformer_class(**kwargs)
    width = torch.finfo(dtype).bits // 8
    total = sum(p.numel() for p in model.parameters())
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = sum(m.weight.numel() for n, m in linears if not fp8.is_skipped(n, fp8.DEFAULT_SKIP))
    lora = (
        sum(
            rank * (m.in_features + m.out_features)
            for n, m in linears
            if any(n.endswith("." + t) for t in family.lora_targets)
        )
        * width
    )
    copy_hp, copy_fp8 = total * width, quantized + (total - quantized) * width
    mib = 2**20
    return (
        f"teacher weights, {teachers} teachers of {preset} ({total / 1e6:.2f} M params, {quantized / 1e6:.2f} M in "
        f"FP8 linears, LoRA r{rank} {lora / mib:.2f} MiB each): merged {teachers * copy_hp / mib:.1f} MiB, "
        f"merged fp8 {teachers * copy_fp8 / mib:.1f} MiB, adapter {(copy_hp + teachers * lora) / mib:.1f} MiB, "
        f"adapter fp8 {(copy_fp8 + teachers * lora) / mib:.1f} MiB ({str(dtype).removeprefix('torch.')} base)"
    )


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# report


LOSS_TOLERANCE = {"model": 0.01, "fp8": 0.05}  # round-0 loss, relative to the official-like one (see verdict)


def loss_diff(r: dict, base: dict) -> float:
    """|loss - base loss| / |base loss| of the round-0 losses."""
    return abs(r["loss0"] - base["loss0"]) / max(abs(base["loss0"]), 1e-30)


def fmt_cos(cos: float | None) -> str:
    return "n/a" if cos is None else f"{cos:.6f}"


def table(results: dict, flops: float, ceiling: float, notes: dict[str, str] | None = None) -> str:
    """The ladder as a markdown table. "phases / wall": the phases' summed time over the round's wall time. On CUDA
    the phases are device time (events on the stream running each), so well below 1 means the device idles while
    the host prepares work (the host is the bottleneck); above 1 means phases overlap (side-stream teachers).
    notes: text shown after a variant's label (e.g. the precision its student runs in)."""
    timed = [label for label, r in results.items() if "round_s" in r]
    base_label = "official-like" if "official-like" in timed else timed[0]
    base = results[base_label]
    head = (
        f"| variant | img/s | x {base_label} | round s | " + " | ".join(PHASES) + " | phases / wall | peak GB | "
        "teacher MB | MFU | round-0 loss | loss rel. diff | grad cos |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, r in results.items():
        shown = f"{label} ({notes[label]})" if notes and label in notes else label
        if "round_s" not in r:
            lines.append(f"| {shown} | {r.get('skipped') or r.get('error')} |" + " |" * (head.count("|") - 3))
            continue
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "n/a"
        phases = " | ".join(f"{r['phases_s'][p]:.3f}" for p in PHASES)
        mfu = flops / (r["round_s"] * ceiling)
        lines.append(
            f"| {shown} | {r['images_per_s']:.3f} | {base['round_s'] / r['round_s']:.2f} | "
            f"{r['round_s']:.3f} | {phases} | {phase_share(r):.2f} | {peak} | {r['teacher_mb']:.2f} | "
            f"{100 * mfu:.2f}% | {r['loss0']:.6g} | {loss_diff(r, base):.2e} | {fmt_cos(r['grad_cos'])} |"
        )
    return "\n".join(lines)


def phase_share(r: dict) -> float:
    """Summed phase seconds over the round's wall seconds."""
    return sum(r["phases_s"].values()) / r["round_s"]


def verdict(results: dict, target: float = 2.0) -> str:
    """The issue's target: the fastest variant whose round-0 loss is within tolerance of the official-like one
    (LOSS_TOLERANCE: 1% with teachers at the model's precision, where only summation order and merged-vs-adapter
    rounding differ; 5% with FP8 teachers, whose velocity error (bench/fp8_accuracy.py) enters the squared mean
    difference directly)."""
    base = results.get("official-like")
    if base is None or "round_s" not in base:
        return "target: not checked (the official-like variant did not run)"
    ok = {
        label: r
        for label, r in results.items()
        if "round_s" in r and loss_diff(r, base) <= LOSS_TOLERANCE[r["precision"]]
    }
    failed = [
        f"{label} ({loss_diff(r, base):.1%})" for label, r in results.items() if "round_s" in r and label not in ok
    ]
    label, best = min(ok.items(), key=lambda item: item[1]["round_s"])
    speedup = base["round_s"] / best["round_s"]
    return (
        f"target: {speedup:.2f}x the official-like images/s ({label}), round-0 loss within "
        f"{LOSS_TOLERANCE[best['precision']]:.0%} ({loss_diff(best, base):.2%}, gradient cosine "
        f"{fmt_cos(best['grad_cos'])}): "
        f"{'PASS' if speedup >= target else 'FAIL'} (>= {target:g}x asked at SD3.5-M 512 px on one H200)"
        + (f"; loss outside tolerance: {', '.join(failed)}" if failed else "")
    )


def ordered(results: dict) -> dict:
    order = [label for _, label, *_ in LADDER + ALTERNATIVES]
    return {label: results[label] for label in order if label in results}


def write_report(
    args, results: dict, machine: str, interleave: bool, flops: float, ceiling: float, ceiling_what: str
) -> str:
    """The report (header, teacher memory, table, verdict) of the variants in `results`, written to --md and --json
    where given; returned for printing."""
    cuda = torch.device(args.device).type == "cuda"
    blocks = f" ({args.layers} blocks)" if args.layers else ""
    threads = f", {torch.get_num_threads()} thread(s)" if not cuda else ""
    header = (
        f"{args.preset}{blocks} @ {args.resolution}px, {args.dtype}, {args.device} ({machine}, torch "
        f"{torch.__version__}), {len(TASKS)} tasks x {args.prompts} prompts, 10 steps / 9 trained, fastest of "
        f"{args.rounds} round(s) after {args.warmup} warm-up{', interleaved' if interleave else ''}{threads}"
    )
    ceiling_line = (
        f"ceiling: {ceiling / 1e12:.3f} TFLOP/s ({ceiling_what}); useful work per round: "
        f"{flops / 1e12:.4f} TFLOP (FlopCounterMode)"
    )
    memory = teacher_memory_by_mode(
        args.preset, args.layers, getattr(torch, args.dtype), rank=4 if args.preset.startswith("tiny") else 32
    )
    # Every row's student runs as ours does: a 16-bit base with fp32 LoRA weights trains under autocast, the
    # official-like row too (the released code autocasts its whole forward to fp16), so the ladder compares schedules
    short = {"bfloat16": "bf16", "float16": "fp16"}
    notes = {"official-like": f"{short[args.dtype]} autocast student"} if args.dtype in short else None
    text = f"\n{header}\n{ceiling_line}\n\n{memory}\n\n{table(results, flops, ceiling, notes)}\n\n{verdict(results)}"
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        report = {
            "preset": args.preset,
            "layers": args.layers,
            "resolution": args.resolution,
            "device": machine,
            "dtype": args.dtype,
            "ceiling_flops": ceiling,
            "round_flops": flops,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-sd3", choices=sorted(PRESETS))  # every family's presets
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 tiny, 512 otherwise)")
    ap.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--layers", type=int, default=None, help="keep only this many blocks (widths unchanged)")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per task (one micro-batch)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (the fastest is reported)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (tiny GEMMs gain nothing from more)")
    ap.add_argument("--variants", default=None, help="comma-separated keys (default: the whole ladder)")
    ap.add_argument("--compile", action="store_true", help="include torch.compile on CPU (always tried on CUDA)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="also write the report here (rewritten after every variant)")
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    args.resolution = args.resolution or (64 if args.preset.startswith("tiny") else 512)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    known = [k for k, _, _ in LADDER] + [k for k, *_ in ALTERNATIVES]
    wanted = args.variants.split(",") if args.variants else known
    if unknown := [k for k in wanted if k not in known]:
        ap.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(known)})")

    ceiling, ceiling_what = matmul_ceiling(args.device)
    pristine = build_random_transformer(args.preset, args.device, getattr(torch, args.dtype), layers=args.layers)
    large = not args.preset.startswith("tiny")
    results, states, flops, reference_grad = {}, {}, None, None  # the official-like round-0 gradient
    # CPU, tiny: every variant's trainer is built first and their timed rounds interleave, so load from other
    # processes hits all variants alike. CUDA, or a large preset: one variant at a time (one set of models in memory).
    interleave = not cuda and not large
    machine = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU"
    unavailable = {} if cuda else dict(CUDA_ONLY)  # variant -> why it cannot run here
    flash_ok, flash_why = attention.flash_available()
    if not flash_ok:
        unavailable["flash"] = flash_why
    with tempfile.TemporaryDirectory(prefix="bench_round_") as tmp:
        scratch = Path(tmp)
        tasks = write_world(
            scratch / "world",
            pristine,
            rank=32 if large else 4,
            alpha=64 if large else 8,
            prompts=args.prompts,
            lora_targets=preset_arch(args.preset)[0].lora_targets,
        )
        state, live = dict(START), {}
        plan = [(k, label, None, changes) for k, label, changes in LADDER] + list(ALTERNATIVES)
        for index, (key, label, based_on, changes) in enumerate(plan):
            state = dict(states[based_on] if based_on else state, **changes)
            states[key] = state
            if key not in wanted:
                continue
            if key in unavailable:
                results[label] = {"skipped": f"skipped: {unavailable[key]}"}
                continue
            if key == "compile" and not (cuda or args.compile):
                results[label] = {"skipped": "skipped on CPU (pass --compile)"}
                continue
            t0 = time.perf_counter()
            try:
                trainer, round_zero = build_trainer(args, tasks, state, scratch, index, pristine)
                if flops is None:
                    flops = count_round_flops(trainer)
                warm_up(trainer, args, round_zero)
                if interleave:
                    live[key] = (label, trainer, round_zero, state, [])
                    continue
                rounds = [timed_round(trainer, args, round_zero) for _ in range(args.rounds)]
                if key == "official":
                    reference_grad = round_zero.grad
                results[label] = summarize(trainer, round_zero, rounds, args, state, reference_grad)
            except Exception as e:  # noqa: BLE001  (a variant that fails here, e.g. compile, is reported, not fatal)
                results[label] = {"error": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            trainer = None
            free(args.device)
            print(f"{label}: {results[label]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            if flops is not None and not interleave:  # a run cut short (a time limit) keeps the variants done
                write_report(args, ordered(results), machine, interleave, flops, ceiling, ceiling_what)
        for _ in range(args.rounds):
            for _, trainer, round_zero, state, rounds in live.values():
                rounds.append(timed_round(trainer, args, round_zero))
        if "official" in live:
            reference_grad = live["official"][2].grad
        for label, trainer, round_zero, state, rounds in live.values():
            results[label] = summarize(trainer, round_zero, rounds, args, state, reference_grad)
    if flops is None:  # no variant got as far as a trainer
        print(
            "no variant ran:\n"
            + "\n".join(f"  {label}: {r.get('skipped') or r.get('error')}" for label, r in results.items()),
            file=sys.stderr,
        )
        return 1
    print(write_report(args, ordered(results), machine, interleave, flops, ceiling, ceiling_what))
    return 0


if __name__ == "__main__":
    sys.exit(main())
