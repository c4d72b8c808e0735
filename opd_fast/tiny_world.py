"""The built-in tiny default's files: three task prompt sets and three teachers on the `tiny-sd3` preset base, one
in each layout a teacher may come in (peft adapter folder, diffusers LoRA file, full transformer folder).

The teachers here are seeded random LoRAs: fixtures that make distillation measurable (the student must move from
the base towards three different, prompt-conditioned targets), not trained task experts; the demo
(`opd-fast demo`) trains real ones. `opd-fast tiny-world DIR` writes them; configs/tiny/ holds a copy, and
opd_fast/builtin/tiny/ the same bytes inside the package (opd_fast.resources).

So that the tiny default can be sampled and evaluated too, it also writes:
- pipeline/: a StableDiffusion3Pipeline folder without its transformer (the student's own, the `tiny-sd3` preset,
  comes from the run): a seeded tiny VAE (8 pixels per latent cell, as the released ones) that decodes the images,
  the scheduler, and seeded tiny text encoders + tokenizers built offline from config (CLIP-L/G hidden 16, T5 32:
  the tiny preset's 32-wide text inputs), for `prompts.encoder: pipeline` trials. Training and evaluation of the
  tiny default encode prompts with the built-in encoder (prompts.encoder: builtin).
- clip/: a seeded tiny CLIP (CLIPModel + processor) and aesthetic_head.safetensors, which the clipscore and
  aesthetic rewards load: fixtures that make evaluation run end to end offline, not meaningful judges.
- prompts/eval_*: each task's evaluation prompts, apart from its training prompts (so evaluation holds none of
  those out, and the tiny default trains as it did before it was evaluated).

The pipeline's and the CLIP's parts come from opd_fast/tiny_parts.py, which also builds the tests' tiny pipelines of
every family: one builder each, so the checked-in files and the tests cannot drift apart.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from opd_fast import tiny_parts
from opd_fast.config import OFFICIAL_LORA_TARGETS, ModelConfig
from opd_fast.families import get_family
from opd_fast.models import load_transformer
from opd_fast.tiny_parts import TinyParts  # noqa: F401  (still importable from here)

TASKS = {
    "geneval": ("peft", 11, "jsonl"),
    "ocr": ("diffusers", 12, "txt"),
    "aesthetic": ("full", 13, "txt"),
}
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
OBJECTS = ["cat", "dog", "car", "cup", "tree", "clock", "chair", "apple"]
WORDS = ["open", "sale", "hello", "cafe", "exit", "stop", "zoo", "tea"]
STYLES = ["a serene lake", "a city at night", "a mountain sunrise", "a flower field", "a foggy forest", "a beach"]
TEACHER_RANK, TEACHER_ALPHA, TEACHER_B_STD = 4, 8, 0.15
EVAL_WORDS = ["taxi", "bank", "park", "menu"]
EVAL_STYLES = ["a desert at dusk", "a snowy village"]
PIPELINE_SEED, CLIP_SEED = 0, 21


def _geneval_row(count: int, color: str, obj: str) -> dict:
    """One GenEval-style metadata row: the prompt and what the detector must find (training and eval rows alike)."""
    return {
        "prompt": f"a photo of {count} {color} {obj}",
        "tag": "counting_color",
        "include": [{"class": obj, "count": count, "color": color}],
    }


def prompts_for(task: str) -> list[dict]:
    if task == "geneval":
        pairs = ((c, o) for c in COLORS for o in OBJECTS)
        return [_geneval_row(1 + i % 3, color, obj) for i, (color, obj) in enumerate(pairs)]
    if task == "ocr":
        return [{"prompt": f'a sign that says "{w}"'} for w in WORDS] + [
            {"prompt": f'a shirt reading "{w}"'} for w in WORDS
        ]
    return [{"prompt": f"{s}, {m}"} for s in STYLES for m in ("high detail", "soft light", "oil painting")]


def eval_prompts_for(task: str) -> list[dict]:
    """A task's evaluation prompts: of its training prompts' kind, none of them a training prompt."""
    if task == "geneval":  # the training set's pairs with another count
        # training's count for pair (c, o) is 1 + index % 3, its index c * len(OBJECTS) + o
        pairs = ((c, o) for c in range(2) for o in range(2))
        return [_geneval_row(1 + (c * len(OBJECTS) + o + 1) % 3, COLORS[c], OBJECTS[o]) for c, o in pairs]
    if task == "ocr":
        return [{"prompt": f'a sign that says "{w}"'} for w in EVAL_WORDS]
    return [{"prompt": f"{s}, {m}"} for s in EVAL_STYLES for m in ("high detail", "soft light")]


def write_pipeline(folder: Path, family_name: str = "sd3", seed: int = PIPELINE_SEED) -> Path:
    """The family's tiny pipeline folder without a transformer (model_index.json names none): whoever loads it
    passes the student's (from_pretrained(folder, transformer=...)). The caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return tiny_parts.write_pipeline(folder, get_family(family_name), seed)


def write_clip(folder: Path, seed: int = CLIP_SEED, image_size: int = 32) -> Path:
    """A tiny random CLIPModel + CLIPProcessor folder, and aesthetic_head.safetensors: what the clipscore, pickscore
    and aesthetic rewards load. The caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return tiny_parts.write_clip(folder, seed, image_size, aesthetic_head=True)


def _teacher_model(seed: int):
    from peft import LoraConfig, get_peft_model

    base = load_transformer(ModelConfig(family="sd3", preset="tiny-sd3"), get_family("sd3"))
    config = LoraConfig(
        r=TEACHER_RANK,
        lora_alpha=TEACHER_ALPHA,
        target_modules=list(OFFICIAL_LORA_TARGETS),
        init_lora_weights="gaussian",
    )
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * TEACHER_B_STD)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / TEACHER_RANK)
    return model, config


def write_tiny_world(out: str | Path) -> Path:
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    out = Path(out)
    for task, (layout, seed, fmt) in TASKS.items():
        rows = prompts_for(task)
        prompt_file = out / "prompts" / f"{task}.{fmt}"
        prompt_file.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(r) if fmt == "jsonl" else r["prompt"] for r in rows]
        prompt_file.write_text("\n".join(lines) + "\n")
        eval_rows = eval_prompts_for(task)
        eval_lines = [json.dumps(r) if fmt == "jsonl" else r["prompt"] for r in eval_rows]
        (out / "prompts" / f"eval_{task}.{fmt}").write_text("\n".join(eval_lines) + "\n")

        model, config = _teacher_model(seed)
        target = out / "teachers" / task
        if layout == "peft":
            model.save_pretrained(target)  # adapter_config.json + adapter_model.safetensors, peft's own layout
            (target / "README.md").unlink()  # peft's model-card stub
        elif layout == "diffusers":
            StableDiffusion3Pipeline.save_lora_weights(
                target,
                transformer_lora_layers={
                    k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()
                },
                transformer_lora_adapter_metadata=config.to_dict(),
            )
        else:
            model.merge_and_unload().save_pretrained(target)
    write_pipeline(out / "pipeline")
    write_clip(out / "clip")
    return out


if __name__ == "__main__":
    print(write_tiny_world(sys.argv[1] if len(sys.argv) > 1 else "configs/tiny"))
