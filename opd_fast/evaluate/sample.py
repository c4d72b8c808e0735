"""Images from the real diffusers pipeline of the model's family (from a local folder), for the
student (the run's exported LoRA, through `load_lora_weights`), its EMA, the base model, or any task's teacher.

Order of work, so that no two large models need to be resident at once: the prompts (and the negative prompt) are
encoded as training encodes them (prompts.encoder: the pipeline's own text encoders, opd_fast.text_encoders, which
are then freed; or the built-in encoder), so the student sees what it was trained on; the pipeline is loaded
without text encoders, given the model's weights, and run on the cached embeddings.

The pipeline folder is model.path, or eval.pipeline where the model is a preset (the tiny default: its folder
holds the VAE and scheduler, and the transformer is the preset's seeded one, as in training).

Seeds are per prompt index (seed + index, drawn on a CPU generator): image i is the same whatever the batch size,
the device or which other prompts are sampled with it.

Output folder: images/00000.png ..., grid.png (the first `grid_max` images), samples.jsonl (one line per image:
index, prompt, seed, file, metadata) and sample.json (what was sampled and how), which `opd-fast eval` reads.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from opd_fast import attention
from opd_fast.config import ConfigError, RunConfig
from opd_fast.families import Family, family_for_run
from opd_fast.models import DTYPES
from opd_fast.prompts import PromptSet
from opd_fast.text_encoders import PipelineTextEncoder, check_pipeline_folder

log = logging.getLogger(__name__)
EVAL_STEPS = 40  # the paper's evaluation setting (its guidance, 4.5, is the student's own in our configs)


@dataclass
class SampleSettings:
    model: str = "student"  # student | ema | base | teacher:TASK
    task: str = ""  # the prompt set's task (a label for eval)
    num_steps: int = EVAL_STEPS
    guidance: float | None = None  # None: the student's (student/ema/base) or the teacher's own from the config
    resolution: int | None = None  # None: sampling.resolution of the config
    seed: int = 0
    batch_size: int = 4
    grid_max: int = 64
    extra: dict = field(default_factory=dict)  # filled in: pipeline, weights, guidance actually used


def _student_weights(run_dir: Path | None, which: str) -> Path:
    if run_dir is None:
        raise ConfigError(f"sample --model {which}: needs the run folder (--run) that holds the exported student")
    folder = run_dir / ("lora_diffusers_ema" if which == "ema" else "lora_diffusers")
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return folder
    full = run_dir / "transformer"
    if which == "student" and ((full / "config.json").is_file() or (full / "transformer" / "config.json").is_file()):
        return full  # a full-parameter student (two experts: its transformer/ and transformer_2/ inside)
    hint = " (the run had EMA disabled?)" if which == "ema" else ""
    raise ConfigError(f"sample --model {which}: no exported student in {run_dir} (expected {folder}){hint}")


def load_model_into(
    pipe, cfg: RunConfig, family: Family, which: str, run_dir: Path | None
) -> tuple[str, float | None, Path | None]:
    """Put the weights of `which` into pipe.transformer; returns (a description, the model's own guidance, the
    pipeline folder whose text encoders condition it where they are not the run's: a teacher's own)."""
    model = family.pipeline_model(pipe)
    student_guidance = family.guidance(model, cfg.student.guidance, cfg.student.guidance_2, "student.guidance_2")
    if which == "base":
        return "base", student_guidance, None
    if which in ("student", "ema"):
        weights = _student_weights(run_dir, which)
        if weights.name == "transformer":
            from opd_fast.families.base import model_dtype
            from opd_fast.models import transformer_folder

            dtype = model_dtype(family.pipeline_model(pipe))
            family.set_pipeline_model(pipe, family.load_pretrained(transformer_folder(weights), dtype))
        else:
            family.load_lora_into_pipeline(pipe, weights)  # the pipeline's own loader: alpha/r metadata honoured
        return str(weights), student_guidance, None
    if which.startswith("teacher:"):
        from opd_fast.teachers import load_teacher

        name = which.split(":", 1)[1]
        task = next((t for t in cfg.tasks if t.name == name), None)
        if task is None:
            raise ConfigError(
                f"sample --model {which}: no task {name!r} in the config (tasks: "
                f"{', '.join(t.name for t in cfg.tasks)})"
            )
        teacher = load_teacher(name, task.teacher, family.pipeline_model(pipe), family)  # as training reads it
        family.set_pipeline_model(pipe, teacher.model)
        return task.teacher.path, teacher.guidance, teacher.text_pipeline
    raise ConfigError(f"sample --model: expected student, ema, base or teacher:TASK, got {which!r}")


def make_grid(images: list, columns: int | None = None):
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def _encode(
    cfg: RunConfig, family: Family, prompts: list[str], device, transformer, text_pipeline: Path | None = None
) -> tuple[torch.Tensor, ...]:
    """(embeds, pooled, negative_embeds, negative_pooled) as training encodes them: the built-in encoder at the
    transformer's widths, or the pipeline's text encoders (model.path's, or `text_pipeline`'s: a teacher's own),
    which are then freed."""
    if cfg.prompts.encoder == "builtin":
        encode, _ = family.builtin_text_encoder(transformer, cfg.prompts.max_tokens)
        embeds, pooled = encode(prompts)
        negative, negative_pooled = encode([cfg.prompts.negative_prompt])
        return embeds, pooled, negative, negative_pooled
    encoder = PipelineTextEncoder(
        text_pipeline or cfg.model.path,
        family,
        DTYPES[cfg.model.dtype],
        device,
        max_sequence_length=cfg.prompts.max_sequence_length,
        batch_size=cfg.prompts.encode_batch_size,
    )
    with encoder:
        embeds, pooled = encoder(prompts)
        negative, negative_pooled = encoder([cfg.prompts.negative_prompt])
    return embeds, pooled, negative, negative_pooled


def sample(
    cfg: RunConfig,
    prompt_set: PromptSet,
    out_dir: str | Path,
    settings: SampleSettings,
    run_dir: str | Path | None = None,
    device: str | None = None,
) -> Path:
    """Generate one image per prompt of `prompt_set` into `out_dir`; returns out_dir."""
    if cfg.model.path is None and cfg.eval.pipeline is None:
        raise ConfigError(
            "sample: needs model.path, a local diffusers pipeline folder (its VAE decodes the images), or "
            "eval.pipeline (such a folder) beside model.preset"
        )
    family = family_for_run(cfg)
    folder = check_pipeline_folder(cfg.model.path or cfg.eval.pipeline, family)
    attention.check(cfg.model.attention)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[cfg.model.dtype]
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    resolution = settings.resolution or cfg.sampling.resolution
    run_dir = Path(run_dir) if run_dir is not None else None

    without_text = dict.fromkeys(family.text_components)  # the embeddings below stand in for the encoders
    if cfg.model.path is None:  # a preset: its seeded transformer, as training builds it
        from opd_fast.models import load_transformer

        without_text["transformer"] = load_transformer(cfg.model, family)
    pipe = family.pipeline_class.from_pretrained(folder, dtype=dtype, local_files_only=True, **without_text)
    weights, own_guidance, text_pipeline = load_model_into(pipe, cfg, family, settings.model, run_dir)
    # after the weights: a teacher of another text width is encoded at its own widths, by its own text encoders
    embeds, pooled, negative, negative_pooled = _encode(
        cfg, family, prompt_set.prompts, device, pipe.transformer, text_pipeline
    )
    attention.use_backend(family.pipeline_model(pipe), cfg.model.attention)
    guidance = settings.guidance if settings.guidance is not None else own_guidance
    guidance = family.no_guidance if guidance is None else guidance  # no CFG, or a guidance embedding of 1.0
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    from tqdm.auto import tqdm

    records, grid_images = [], []
    n = len(prompt_set.prompts)
    for start in tqdm(range(0, n, settings.batch_size), desc=f"sampling {settings.model}", unit="batch"):
        idx = list(range(start, min(start + settings.batch_size, n)))
        generators = [torch.Generator("cpu").manual_seed(settings.seed + i) for i in idx]
        text = family.sampling_inputs(
            embeds[idx].to(device, dtype),
            pooled[idx].to(device, dtype),
            negative.to(device, dtype),
            negative_pooled.to(device, dtype),
            guidance,
        )
        with torch.no_grad():
            images = family.output_images(
                pipe(
                    **text,
                    num_inference_steps=settings.num_steps,
                    height=resolution,
                    width=resolution,
                    generator=generators,
                    output_type="pil",
                )
            )
        for i, image in zip(idx, images):
            file = f"images/{i:05d}.png"
            image.save(out_dir / file)
            meta = prompt_set.metadata[i] if prompt_set.metadata else {}
            records.append(
                {"index": i, "prompt": prompt_set.prompts[i], "seed": settings.seed + i, "file": file, "metadata": meta}
            )
            if len(grid_images) < settings.grid_max:
                grid_images.append(image)
    make_grid(grid_images).save(out_dir / "grid.png")
    with open(out_dir / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    settings.extra = {
        "pipeline": str(folder),
        "weights": weights,
        "guidance": guidance,
        "resolution": resolution,
        "family": family.name,
        "prompts": prompt_set.source,
    }
    (out_dir / "sample.json").write_text(json.dumps(asdict(settings), indent=2))
    log.info("wrote %d images of %s to %s", n, settings.model, out_dir)
    return out_dir
