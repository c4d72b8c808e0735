"""What the demo shows: the results table (results.md / results.json) and three PNGs drawn with PIL alone (no
plotting dependency): samples.png (prompts x models), curves.png (reward against training seconds) and
gradient_variance.png (per-tensor gradient variance, closed form against the PPO-style surrogate)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from opd_fast.demo import world
from opd_fast.demo.roster import (
    CASCADE,
    CASCADE_METHOD,
    CURVES,
    DESCRIPTIONS,
    JOINT,
    OPD_FROM_RL,
    PPO,
    PPO_SWEEP,
    RL_TEACHERS,
    SAMPLE_PROMPTS,
    SDE_NOISE_LEVEL,
    STUDENT,
    TEACHERS,
)
from opd_fast.resources import DEMO_CONFIG, builtin_path

COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]
FONT = ImageFont.load_default()
METHOD_NAMES = {
    "grpo": "Flow-GRPO-Fast",
    "nft": "DiffusionNFT",
}  # roster.RL_TEACHERS' methods, as the report names them


# -- tables --------------------------------------------------------------------------------------------------------
def results_json(tasks, student, joint, teachers, models) -> dict:
    """The results in their fixed shape: {"tasks", "student", "joint_baseline", "teachers", "models": {name:
    {"rewards", "average", "seconds"}}}."""
    return {
        "tasks": list(tasks),
        "student": student,
        "joint_baseline": joint,
        "teachers": dict(teachers),
        "models": {
            name: {
                "rewards": {t: float(m["rewards"][t]) for t in tasks},
                "average": float(m["average"]),
                "seconds": float(m["seconds"]),
            }
            for name, m in models.items()
        },
    }


def markdown_table(results: dict, descriptions: dict[str, str]) -> str:
    tasks = results["tasks"]
    lines = [
        "| model | " + " | ".join(tasks) + " | average | seconds | what it is |",
        "|---|" + "---:|" * (len(tasks) + 2) + "---|",
    ]
    for name, m in results["models"].items():
        cells = [f"{m['rewards'][t]:.3f}" for t in tasks] + [f"**{m['average']:.3f}**", f"{m['seconds']:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {descriptions.get(name, '')} |")
    return "\n".join(lines)


def evaluated_models(results: dict[str, dict]) -> dict[str, dict]:
    """{name: {"rewards", "average", "seconds"}} for every model of roster.DESCRIPTIONS the run evaluated, in the
    table's order (a preset may leave some out)."""
    models = {}
    for name in DESCRIPTIONS:
        if f"eval/{name}" in results:
            rewards = results[f"eval/{name}"]["rewards"]
            models[name] = {
                "rewards": rewards,
                "average": float(np.mean([rewards[t] for t in world.TASKS])),
                "seconds": results[name]["seconds"],
            }
    return models


def best_ppo(models: dict[str, dict]) -> str:
    """The PPO-style baseline's best run of its learning-rate sweep (roster.PPO_SWEEP): the highest average reward
    in the final evaluation (the first on a tie). Choosing on the evaluation flatters the baseline, not OPD."""
    sweep = [name for name in PPO_SWEEP if name in models]
    return max(sweep, key=lambda name: models[name]["average"])


def table_models(models: dict[str, dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """The table's rows (of the PPO sweep, the best run alone) and their descriptions."""
    best = best_ppo(models)
    rows = {n: m for n, m in models.items() if n not in PPO_SWEEP or n == best}
    descriptions = dict(DESCRIPTIONS)
    swept = [n for n in PPO_SWEEP if n in models]
    if len(swept) > 1:
        descriptions[best] += f"; the best of {len(swept)} learning rates on the same budget"
    return rows, descriptions


def bar_checks(results: dict, fraction: float = 0.9) -> list[tuple[str, bool]]:
    """The claims the demo must reproduce, each with whether it holds."""
    models, student = results["models"], results["student"]
    checks = []
    for task, teacher in results["teachers"].items():
        mine, theirs = models[student]["rewards"][task], models[teacher]["rewards"][task]
        line = (
            f"student reaches >= {fraction:.0%} of the {task} teacher on {task}: {mine:.3f} vs "
            f"{fraction:.2f} x {theirs:.3f} = {fraction * theirs:.3f}"
        )
        checks.append((line, mine >= fraction * theirs))
    joint = results["joint_baseline"]
    mine, theirs = models[student]["average"], models[joint]["average"]
    checks.append(
        (f"student beats the joint multi-task baseline on the average: {mine:.3f} vs {theirs:.3f}", mine > theirs)
    )
    return checks


# -- drawing helpers -----------------------------------------------------------------------------------------------
def _text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=FONT)
    return right - left


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


class Axes:
    """A plotting box on a PIL image: data -> pixel mapping, frame, ticks, labels; linear or log10 axes."""

    def __init__(self, image, box, xlim, ylim, xlabel, ylabel, title, logx=False, logy=False):
        self.draw = ImageDraw.Draw(image)
        self.box, self.logx, self.logy = box, logx, logy
        self.xlim = tuple(math.log10(v) for v in xlim) if logx else xlim
        self.ylim = tuple(math.log10(v) for v in ylim) if logy else ylim
        left, top, right, bottom = box
        self.draw.rectangle(box, outline=(0, 0, 0))
        for value in _nice_ticks(*self.xlim):
            x, _ = self.point(10**value if logx else value, None)
            self.draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
            label = f"1e{value:g}" if logx else f"{value:g}"
            self.draw.text((x - _text_width(self.draw, label) / 2, bottom + 6), label, fill=(0, 0, 0), font=FONT)
        for value in _nice_ticks(*self.ylim):
            _, y = self.point(None, 10**value if logy else value)
            self.draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
            label = f"1e{value:g}" if logy else f"{value:g}"
            self.draw.text((left - 8 - _text_width(self.draw, label), y - 5), label, fill=(0, 0, 0), font=FONT)
        self.draw.text(
            ((left + right - _text_width(self.draw, xlabel)) / 2, bottom + 22), xlabel, fill=(0, 0, 0), font=FONT
        )
        self.draw.text((left, top - 30), title, fill=(0, 0, 0), font=FONT)
        self.draw.text((left, top - 16), ylabel, fill=(80, 80, 80), font=FONT)

    def point(self, x, y):
        left, top, right, bottom = self.box
        px = py = None
        if x is not None:
            x = math.log10(x) if self.logx else x
            px = left + (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (right - left)
        if y is not None:
            y = math.log10(y) if self.logy else y
            py = bottom - (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (bottom - top)
        return px, py

    def line(self, xs, ys, color, width=2):
        points = [self.point(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            self.draw.line(points, fill=color, width=width)
        for px, py in points:
            self.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)

    def legend(self, entries: list[tuple[str, tuple[int, int, int]]], corner="lower right"):
        left, top, right, bottom = self.box
        width = max(_text_width(self.draw, label) for label, _ in entries) + 30
        x0 = right - width - 8 if "right" in corner else left + 8
        y0 = bottom - 14 * len(entries) - 8 if "lower" in corner else top + 8
        self.draw.rectangle(
            [x0 - 4, y0 - 4, x0 + width, y0 + 14 * len(entries)], fill=(255, 255, 255), outline=(180, 180, 180)
        )
        for i, (label, color) in enumerate(entries):
            y = y0 + 14 * i + 6
            self.draw.line([(x0, y), (x0 + 18, y)], fill=color, width=3)
            self.draw.text((x0 + 24, y - 6), label, fill=(0, 0, 0), font=FONT)


# -- figures -------------------------------------------------------------------------------------------------------
def samples_png(
    path: Path, model_names: list[str], prompts: list[str], images: dict[str, np.ndarray], scale: int = 5
) -> None:
    """A grid: one row per model, one column per prompt; images[name] is (len(prompts), 16, 16, 3) in [0, 1]."""
    cell = 16 * scale + 6
    label_width, header = 150, 36
    canvas = Image.new("RGB", (label_width + cell * len(prompts), header + cell * len(model_names)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(prompts):  # two lines of header: prompts are short
        words = prompt.split()
        half = (len(words) + 1) // 2
        for k, line in enumerate((" ".join(words[:half]), " ".join(words[half:]))):
            x = label_width + j * cell + (cell - _text_width(draw, line)) / 2
            draw.text((x, 4 + 13 * k), line, fill=(0, 0, 0), font=FONT)
    for i, name in enumerate(model_names):
        y = header + i * cell
        draw.text((4, y + cell / 2 - 6), name, fill=(0, 0, 0), font=FONT)
        for j in range(len(prompts)):
            tile = Image.fromarray((np.clip(images[name][j], 0, 1) * 255).astype(np.uint8))
            canvas.paste(tile.resize((16 * scale, 16 * scale), Image.NEAREST), (label_width + j * cell + 3, y + 3))
    canvas.save(path)


def curves_png(path: Path, curves: dict[str, dict], title: str) -> None:
    """Average reward (over the curve subset of each task) against training seconds, one line per method."""
    image = Image.new("RGB", (720, 440), "white")
    series = {}
    for name, curve in curves.items():
        averages = [float(np.mean(list(r.values()))) for r in curve["rewards"]]
        series[name] = (curve["seconds"], averages)
    x_max = max(max(xs) for xs, _ in series.values()) * 1.05 or 1.0
    y_values = [y for _, ys in series.values() for y in ys]
    y_lo, y_hi = min(y_values), max(y_values)
    pad = 0.05 * (y_hi - y_lo or 1.0)
    axes = Axes(
        image,
        (70, 50, 700, 390),
        (0, x_max),
        (max(0.0, y_lo - pad), min(1.0, y_hi + pad) + 1e-6),
        "training seconds (evaluation time excluded)",
        "average reward",
        title,
    )
    entries = []
    for k, (name, (xs, ys)) in enumerate(series.items()):
        axes.line(xs, ys, COLORS[k % len(COLORS)])
        entries.append((name, COLORS[k % len(COLORS)]))
    axes.legend(entries)
    image.save(path)


def gradient_variance_png(path: Path, closed_form: list[float], ppo: list[float], ratio: float) -> None:
    """One point per LoRA tensor: its mean per-element gradient variance under the closed form (x) and the PPO-style
    surrogate (y); points above the diagonal mean PPO is noisier."""
    image = Image.new("RGB", (480, 440), "white")
    pairs = [(a, b) for a, b in zip(closed_form, ppo) if a > 0 and b > 0]
    values = [v for pair in pairs for v in pair]
    lo, hi = 10 ** math.floor(math.log10(min(values))), 10 ** math.ceil(math.log10(max(values)))
    axes = Axes(
        image,
        (80, 50, 460, 390),
        (lo, hi),
        (lo, hi),
        "closed-form gradient variance",
        "PPO-style gradient variance",
        f"per-tensor gradient variance (mean ratio PPO/closed form {ratio:.1f}x)",
        logx=True,
        logy=True,
    )
    axes.draw.line([axes.point(lo, lo), axes.point(hi, hi)], fill=(160, 160, 160), width=1)
    for a, b in pairs:
        px, py = axes.point(a, b)
        axes.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLORS[0])
    image.save(path)


def rl_section(models: dict[str, dict], results: dict[str, dict]) -> str:
    """What the RL-trained teacher sets, OPD from each and the cascade show ("" when the preset ran none)."""
    if not all(n in models for n in OPD_FROM_RL):
        return ""

    def average(names) -> str:  # each teacher on its own task, averaged over the tasks
        return f"{np.mean([models[names[t]]['rewards'][t] for t in world.TASKS]):.3f}"

    sets = [("reward-filtered fine-tuning", TEACHERS, STUDENT)] + [
        (METHOD_NAMES[method], teachers, next(n for n, m in OPD_FROM_RL.items() if m == method))
        for method, teachers in RL_TEACHERS.items()
    ]
    lines = [
        f"| {label} | {average(teachers)} | {models[student]['average']:.3f} | "
        f"{models[student]['average'] / float(average(teachers)):.0%} |"
        for label, teachers, student in sets
    ]
    cascade, nft = CASCADE[world.TASKS[-1]], RL_TEACHERS[CASCADE_METHOD]
    chain = " -> ".join(results[cascade]["chain"])
    return (
        """

## Stage 1 by diffusion RL, OPD from each teacher set, and the cascade

Beside the reward-filtered teachers, two teacher sets trained by diffusion RL on each task's reward through the real
stage-1 trainer (`opd-fast teach`: Flow-GRPO with the Fast window, DiffusionNFT), and the student's own OPD run
(same config, same budget) distilled from each set. OPD inherits its teachers: the student is only as good as the
set it distils, so a weaker set gives a weaker student; the bars above are about the student of the reward-filtered
set. Per set: the teachers' mean reward, each on its own task; the OPD student's average; their ratio.

| teacher set | teachers on their tasks | OPD student | student / teachers |
|---|---:|---:|---:|
"""
        + "\n".join(lines)
        + f"""

The cascade baseline (the paper's Cascade NFT) runs DiffusionNFT on one task after another ({chain}), each
from the previous task's LoRA, on the student's budget in all (the paper reports that it forgets the earlier
tasks): average {models[cascade]["average"]:.3f}; on each task, the cascade against the DiffusionNFT teacher of that
task: {", ".join(f"{t} {models[cascade]['rewards'][t]:.3f} vs {models[nft[t]]['rewards'][t]:.3f}" for t in world.TASKS)}."""
    )


def ppo_section(models: dict[str, dict]) -> str:
    """The PPO-style baseline's learning-rate sweep ("" when the preset ran one learning rate)."""
    swept = [n for n in PPO_SWEEP if n in models]
    if len(swept) < 2:
        return ""
    best = best_ppo(models)
    lrs = {n: "the student's" if PPO_SWEEP[n] is None else f"{PPO_SWEEP[n]:.0e}".replace("e-0", "e-") for n in swept}
    lines = [
        f"| {n} | {lrs[n]} | "
        + " | ".join(f"{models[n]['rewards'][t]:.3f}" for t in world.TASKS)
        + f" | {models[n]['average']:.3f} |"
        + (" best |" if n == best else " |")
        for n in swept
    ]
    return (
        """

## The PPO-style baseline's learning-rate sweep (same budget; the table shows the best)

| run | lr | """
        + " | ".join(world.TASKS)
        + """ | average | |
|---|---|"""
        + "---:|" * (len(world.TASKS) + 1)
        + """---|
"""
        + "\n".join(lines)
    )


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- the whole report ----------------------------------------------------------------------------------------------
def write_report(out: Path, preset: str, results: dict[str, dict], folders: dict[str, Path], seconds: float) -> dict:
    """Everything in OUT from the stages' results (by stage name) and folders; returns results.json's content."""
    tasks = world.TASKS
    evaluated = evaluated_models(results)
    models, descriptions = table_models(evaluated)
    summary = results_json(tasks, STUDENT, JOINT, TEACHERS, models)
    write_json(out / "results.json", summary)

    names = list(models)
    samples = {n: np.load(folders[f"eval/{n}"] / "samples.npy") for n in names}
    prompts = [p for t in tasks for p in SAMPLE_PROMPTS[t]]
    samples_png(out / "samples.png", names, prompts, samples)
    best = best_ppo(evaluated)
    curves = [best if n == PPO else n for n in CURVES if n in evaluated]
    curves_png(
        out / "curves.png",
        {n: results[n]["curve"] for n in curves},
        "stage 2 on one budget: average reward of the curve subset",
    )
    variance = results["gradient-variance"]
    gradient_variance_png(
        out / "gradient_variance.png",
        variance["per_tensor"]["closed_form"],
        variance["per_tensor"]["ppo"],
        variance["ratio"],
    )
    details = {
        "preset": preset,
        "demo_seconds": seconds,
        "budgets": {n: results[n]["units"] for n in evaluated if n != "base"},
        "curves": {n: results[n]["curve"] for n in curves},
        "ppo_sweep": {
            "best": best,
            "runs": {
                n: {"lr": PPO_SWEEP[n], "rewards": evaluated[n]["rewards"], "average": evaluated[n]["average"]}
                for n in PPO_SWEEP
                if n in evaluated
            },
        },
        "gradient_variance": variance,
        "opd_overrides": results[STUDENT]["overrides"],
        "cache": {k: str(v) for k, v in folders.items()},
    }
    write_json(out / "details.json", details)

    checks = bar_checks(summary)
    teacher_seconds = sum(models[t]["seconds"] for t in TEACHERS.values())
    command = f"opd-fast train {builtin_path(DEMO_CONFIG)} --out OUT " + " ".join(
        f"--set '{o}'" for o in results[STUDENT]["overrides"]
    )
    text = (
        f"""# opd-fast demo: DiffusionOPD in miniature ({preset})

Three tasks on 16x16 images from a tiny SD3-architecture transformer (no VAE: the image is the latent), three
teachers fine-tuned on reward-filtered data, one student distilled from all three on its own rollouts; the baselines of the
paper's Table 1 on the OPD student's compute budget. Rewards are in [0, 1], higher is better; the final evaluation
samples every prompt of each task ({", ".join(f"{t}: {len(world.task_prompts(t))}" for t in tasks)}) with fixed
noise, ODE, the training step count. Seconds: each model's own training (teachers: {teacher_seconds:.0f} s in all,
before any OPD run can start). The whole demo took {seconds:.0f} s.

{markdown_table(summary, descriptions)}

"""
        + "\n".join(f"- [{'x' if ok else ' '}] {line}" for line, ok in checks)
        + rl_section(evaluated, results)
        + ppo_section(evaluated)
        + """

## Compute budgets (sample-passes: one sample through the transformer forward = 1, backward = 2)

"""
        + "\n".join(f"- {n}: {results[n]['units']:,}" for n in evaluated)
        + f"""

## Gradient variance: closed form against the PPO-style surrogate

At the fresh student every OPD run starts from, SDE rollouts (a = {SDE_NOISE_LEVEL}), the same {variance["draws"]}
noise draws for both estimators: mean per-parameter variance of the round gradient over the draws, closed form
{variance["variance_closed_form"]:.3e}, PPO-style {variance["variance_ppo"]:.3e}: **{variance["ratio"]:.1f}x** higher
for PPO ({variance["parameters"]:,} parameters with a gradient; cosine of the two mean gradients
{variance["mean_gradient_cosine"]:.3f}: both estimate the same expected gradient, as tests/test_reference.py checks
with many draws, but {variance["draws"]} draws of the PPO-style one leave its mean this noisy). Plot:
gradient_variance.png.

## Files

- samples.png: the sample prompts (columns) for every model (rows), first evaluation seed
- curves.png: average reward of the curve subset against training seconds, stage-2 methods
- results.json: the table; details.json: budgets, curves, gradient variance, cache folders

## The OPD stage by hand

The student is `opd-fast train` on the demo's config (the installed copy of configs/demo.yaml) pointed at its cache:

    {command}
"""
    )
    (out / "results.md").write_text(text)
    print(markdown_table(summary, descriptions))
    for line, ok in checks:
        print(("PASS " if ok else "FAIL ") + line)
    print(f"gradient variance, PPO-style / closed form: {variance['ratio']:.1f}x")
    print(f"wrote {out / 'results.md'} (+ results.json, samples.png, curves.png, gradient_variance.png)")
    return summary
