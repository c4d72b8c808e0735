import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in the interpreter; it must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from opd_fast import fp8  # after TRITON_INTERPRET is set
from opd_fast.families import FAMILIES
from opd_fast.hooks import Hook

# FP8 with rowwise scales on CPU tensors needs torch >= 2.13 (the pinned CPU build); on a GPU machine's older torch
# the CPU-side rowwise tests skip, and the CUDA ones run.
_CPU_ROWWISE, _WHY_NOT = fp8.scaling_supported("rowwise", "cpu")
needs_cpu_rowwise = pytest.mark.skipif(not _CPU_ROWWISE, reason=_WHY_NOT)

# Video families render few frames in the tests: Wan's 81 (21 latent frames) cost seconds per tiny sample; 5 keep
# two latent frames, so every per-frame path still runs. A config of a video family gets them with
# video_overrides(family); a family object with run_family(family), as a run's sampling section would set it up.
TEST_FRAMES = 5


def is_video(family) -> bool:
    return hasattr(family, "num_frames")


def run_family(family):
    from opd_fast.config import SamplingConfig

    return family.for_run(SamplingConfig(num_frames=TEST_FRAMES if is_video(family) else None))


def video_overrides(family) -> dict:
    """The config keys that give a video family's tests TEST_FRAMES frames (nothing for an image family)."""
    return {"num_frames": TEST_FRAMES} if is_video(family) else {}


# Family-generic tests run for every registered model family: a new family module is tested without editing them.
every_family = pytest.mark.parametrize("family", [run_family(f) for f in FAMILIES.values()], ids=list(FAMILIES))

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


def offline_wandb_env(monkeypatch, home: Path) -> None:
    """W&B without network or the user's files: offline, silent, its settings and caches under `home`, no console
    capture (pytest holds stdout), no system sampling, none of the user's W&B variables."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB__DISABLE_STATS": "true",
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_ARTIFACT_DIR": str(home / "artifacts"),
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


def set_args(overrides: list[str]) -> list[str]:
    """The CLI arguments of KEY=VALUE overrides: --set KEY=VALUE for each."""
    return [arg for kv in overrides for arg in ("--set", kv)]


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, Path]:
    """A tiny saved pipeline folder of every registered model family (tests/tiny_pipeline.py), written once per
    session: family name -> folder. A test that edits one puts it back, or edits a copy."""
    from tiny_pipeline import write_tiny_pipeline

    from opd_fast.families import FAMILIES

    root = tmp_path_factory.mktemp("pipelines")
    return {name: write_tiny_pipeline(root / name, family) for name, family in FAMILIES.items()}


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

    def make(device="cpu", hooks=(), timer=None, **overrides):
        cfg = tiny_config(**overrides)
        cfg.tasks = [t for t in cfg.tasks if t.name == "ocr"]
        count.append(1)
        return Trainer.build(cfg, tmp_path / f"run{len(count)}", device=device, hooks=hooks, timer=timer)

    return make


class GradientCapture(Hook):
    """Keeps the student's accumulated gradient of every round it sees, by parameter name (the single engine: the
    parameters' .grad)."""

    def __init__(self):
        self.rounds: list[dict[str, torch.Tensor]] = []

    def after_gradients(self, trainer, round_idx):
        self.rounds.append({n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.requires_grad})

    def flat(self, index: int = -1) -> torch.Tensor:
        return torch.cat([g.flatten() for g in self.rounds[index].values()])


def capture_round_gradient(trainer) -> dict[str, torch.Tensor]:
    """The student's accumulated gradient of one measured round (train_round(step=False): no optimizer step)."""
    capture = GradientCapture()
    trainer.hooks.append(capture)
    try:
        trainer.train_round(step=False)
    finally:
        trainer.hooks.remove(capture)
    return capture.rounds[0]


def tiny_sd3_inputs() -> dict[str, torch.Tensor]:
    """Fixed transformer inputs for the tiny-sd3 preset (batch 2, 8x8 latents, 5 text tokens)."""
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.tensor([900.0, 300.0]),
    )


def sd3_pipeline_output(base_folder: Path, lora_folder: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What StableDiffusion3Pipeline's transformer outputs on `inputs` after load_lora_weights(lora_folder), the
    base transformer read from base_folder: how a user loads our diffusers-layout export."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(base_folder),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.load_lora_weights(lora_folder)
    with torch.no_grad():
        return pipe.transformer(**inputs).sample
