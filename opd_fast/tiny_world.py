"""The built-in tiny default's files: three task prompt sets and three teachers on the `tiny-sd3` preset base, one
in each layout a teacher may come in (peft adapter folder, diffusers LoRA file, full transformer folder).

The teachers here are seeded random LoRAs: fixtures that make distillation measurable (the student must move from
the base towards three different, prompt-conditioned targets), not trained task experts; the demo
(`opd-fast demo`) trains real ones. `opd-fast tiny-world DIR` writes them; configs/tiny/ holds a copy, and
opd_fast/builtin/tiny/ the same bytes inside the package (opd_fast.resources).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from opd_fast.config import OFFICIAL_LORA_TARGETS, ModelConfig
from opd_fast.families import get_family
from opd_fast.models import load_transformer

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


def prompts_for(task: str) -> list[dict]:
    if task == "geneval":
        rows = []
        for i, (color, obj) in enumerate((c, o) for c in COLORS for o in OBJECTS):
            count = 1 + i % 3
            rows.append(
                {
                    "prompt": f"a photo of {count} {color} {obj}",
                    "tag": "counting_color",
                    "include": [{"class": obj, "count": count, "color": color}],
                }
            )
        return rows
    if task == "ocr":
        return [{"prompt": f'a sign that says "{w}"'} for w in WORDS] + [
            {"prompt": f'a shirt reading "{w}"'} for w in WORDS
        ]
    return [{"prompt": f"{s}, {m}"} for s in STYLES for m in ("high detail", "soft light", "oil painting")]


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
    return out


if __name__ == "__main__":
    print(write_tiny_world(sys.argv[1] if len(sys.argv) > 1 else "configs/tiny"))
