"""What the benchmark scripts share: a preset's random-weight transformer, and the scratch world a round runs in
(prompt files and random LoRA teachers). Scripts run as `python bench/SCRIPT.py` find this module beside them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from opd_fast.config import OFFICIAL_LORA_TARGETS
from opd_fast.families import preset_arch
from opd_fast.models import init_output_layer

TASKS = (("geneval", 1.0), ("ocr", 4.5), ("aesthetic", 4.5))  # official teachers' CFG


def build_random_transformer(
    preset: str, device: str, dtype: torch.dtype, seed: int = 0, layers: int | None = None
) -> torch.nn.Module:
    """A preset's architecture (families.preset_arch says what `layers` keeps) with seeded random weights, built
    directly on `device` (SD3.5-M or FLUX.1 would take minutes to initialise on the CPU); the final projection
    initialised as opd_fast.models initialises a preset's."""
    family, kwargs = preset_arch(preset, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = family.transformer_class(**kwargs)
    init_output_layer(family.output_layer(model))
    if dtype != torch.float32:  # a float32 .to() is a no-op that diffusers still warns about
        model = model.to(dtype)
    return model.requires_grad_(False).eval()


def write_world(
    root: Path, base: torch.nn.Module, rank: int, alpha: int, prompts: int, lora_targets=tuple(OFFICIAL_LORA_TARGETS)
) -> list[dict]:
    """Prompt files and peft-layout LoRA teachers on `lora_targets` (the family's: Family.lora_targets; B ~
    N(0, 0.02^2): a teacher visibly off the base)."""
    targets = [
        name
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in lora_targets)
    ]
    tasks = []
    for seed, (task, guidance) in enumerate(TASKS):
        (root / "prompts").mkdir(parents=True, exist_ok=True)
        prompt_file = root / "prompts" / f"{task}.txt"
        prompt_file.write_text("".join(f"{task} prompt number {i}\n" for i in range(prompts)))
        g = torch.Generator().manual_seed(100 + seed)
        state = {}
        for name in targets:
            out_f, in_f = base.get_submodule(name).weight.shape
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.02
        folder = root / "teachers" / task
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(lora_targets)})
        )
        teacher = {"path": str(folder), "guidance": guidance}
        tasks.append({"name": task, "prompts": str(prompt_file), "teacher": teacher})
    return tasks
