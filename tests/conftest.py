import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in the interpreter; it must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny models are dispatch-bound: one intra-op thread is faster on a 2-core machine and immune to a busy neighbour.
torch.set_num_threads(1)


def tiny_overrides(**extra) -> list[str]:
    """configs/tiny.yaml made smaller still: 4 steps (3 trained), 2 prompts per task, no progress bar."""
    base = {
        "sampling.num_steps": 4,
        "train.rounds": 2,
        "train.micro_batch_size": 2,
        "checkpoint.every": 1,
        "logging.progress": False,
        "logging.tensorboard": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_config():
    from opd_fast.config import load_config

    def make(**extra):
        return load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(**extra))

    return make


@pytest.fixture
def tiny_trainer(tiny_config, tmp_path):
    """Trainers on configs/tiny reduced to its ocr task (diffusers-layout LoRA, CFG 4.5): one task keeps a round
    at about a second on 2 cores."""
    from opd_fast.trainer import Trainer

    count = []

    def make(device="cpu", **overrides):
        cfg = tiny_config(**overrides)
        cfg.tasks = [t for t in cfg.tasks if t.name == "ocr"]
        count.append(1)
        return Trainer(cfg, tmp_path / f"run{len(count)}", device=device)

    return make
