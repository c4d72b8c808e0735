"""Prompt encoding with the real text encoders of a local diffusers pipeline folder (SD3: CLIP-L, CLIP-G, T5;
FLUX: CLIP-L, T5; Qwen-Image: Qwen2.5-VL; Wan: UMT5; Z-Image: Qwen3), for the embedding cache.

Only the text encoders and tokenizers are loaded (no transformer, no VAE), and only when a prompt actually has to be
encoded: a run whose cache is complete never loads them. The embeddings come from the pipeline's own
`encode_prompt`, so training sees exactly the conditioning the pipeline gives at inference. The negative prompt is
encoded like any other prompt (encode_cached asks for it separately), so classifier-free guidance is off here.

    encoder, name = pipeline_encoder(cfg.model, family, cfg.prompts)
    with encoder:                      # the encoders are freed on exit (and when the object is dropped)
        encode_cached(prompt_set, encoder, name, negative, cache_file)
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from opd_fast.config import ConfigError, ModelConfig, PromptsConfig, first_line
from opd_fast.models import DTYPES

if TYPE_CHECKING:
    from opd_fast.families.base import Family

log = logging.getLogger(__name__)


def check_pipeline_folder(path: str | Path, family: Family, key: str = "model.path") -> Path:
    """The folder, after checking it is a diffusers pipeline of `family` (model_index.json names the class); `key`:
    the config key that named it, for the error."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(
            f"{key}: {path} is not a diffusers pipeline folder (no model_index.json); the "
            "pipeline text encoders and sampling need the whole pipeline, not only its transformer"
        )
    cls_name = json.loads(index.read_text()).get("_class_name", "")
    if cls_name != family.pipeline_class_name:
        raise ConfigError(
            f"{key}: {path} holds a {cls_name or 'unnamed'} pipeline but model.family is "
            f"{family.name!r} (expects {family.pipeline_class_name})"
        )
    family.check_pipeline_folder(path)  # a layout of the family's class it does not support
    return path


def missing_text_components(path: Path, family: Family) -> list[str]:
    """The family's text encoders and tokenizers that the pipeline folder `path` lacks (no folder of that name)."""
    return [c for c in family.text_components if not (Path(path) / c).is_dir()]


def _component_config(pipeline: Path, component: str) -> dict | None:
    path = pipeline / component / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if k not in ("_diffusers_version", "_name_or_path", "transformers_version")}


def text_files(pipeline: Path, family: Family) -> dict[str, str]:
    """Each text component's config and tokenizer files, as text: two pipelines encode a prompt alike when they
    are equal (weights are not hashed: the sizes stand in, as in the embedding cache's fingerprint; configs are read
    without the keys that name where or by which version they were saved)."""
    files = {}
    for component in family.text_components:
        for file in sorted((pipeline / component).glob("*")) if (pipeline / component).is_dir() else []:
            if file.suffix in (".json", ".txt", ".model") and file.name != "config.json":
                files[f"{component}/{file.name}"] = file.read_text()
            elif file.name == "config.json":
                files[f"{component}/config.json"] = json.dumps(_component_config(pipeline, component), sort_keys=True)
            elif file.is_file():
                files[f"{component}/{file.name}"] = str(file.stat().st_size)
    return files


def text_set_key(pipeline: Path, family: Family) -> str:
    """A short name of a pipeline folder's text-encoder set: equal for two folders whose text_files are equal, so
    teachers in different folders that share one set share its prompt embeddings."""
    blob = json.dumps(text_files(Path(pipeline), family), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _fingerprint(path: Path, family: Family) -> str:
    """A short hash of the text components' configs, tokenizer files and weight sizes: a different model copied to
    the same path changes the cache name, without hashing gigabytes of weights."""
    h = hashlib.sha256()
    for component in family.text_components:
        folder = path / component
        for file in sorted(folder.glob("*")) if folder.is_dir() else []:
            if not file.is_file():
                continue
            h.update(file.name.encode())
            if file.suffix in (".json", ".txt", ".model"):
                h.update(file.read_bytes())
            else:  # weights: the size stands in for the content
                h.update(str(file.stat().st_size).encode())
    return h.hexdigest()[:16]


class PipelineTextEncoder:
    """encode(prompts) -> (embeds (N, T, D), pooled (N, P)), float32 on the CPU, through the pipeline's own
    encode_prompt. Callable, so it is the `encode_fn` of prompts.encode_cached."""

    pipe = None  # the text-only pipeline, once loaded

    def __init__(
        self,
        path: str | Path,
        family: Family,
        dtype: torch.dtype = torch.float32,
        device=None,
        max_sequence_length: int | None = None,
        batch_size: int = 32,
        progress: bool = True,
        key: str = "model.path",
    ):
        if batch_size < 1:
            raise ConfigError(f"prompts.encode_batch_size: must be >= 1, got {batch_size}")
        if max_sequence_length is not None and max_sequence_length < 1:
            raise ConfigError(f"prompts.max_sequence_length: must be >= 1, got {max_sequence_length}")
        self.path = check_pipeline_folder(path, family, key).resolve()
        self.family = family
        self.dtype = dtype
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_sequence_length = max_sequence_length or family.default_max_sequence_length
        self.batch_size = batch_size
        self.progress = progress
        self.key = key

    @property
    def name(self) -> str:
        """The cache name: a different pipeline, sequence length or dtype is a different encoder."""
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"pipeline-{self.family.name}:{self.path}:msl{self.max_sequence_length}:{dtype}:"
            f"{_fingerprint(self.path, self.family)}"
        )

    def load(self):
        if self.pipe is None:
            log.info("loading the %s text encoders from %s", self.family.name, self.path)
            # transformer / vae None: diffusers skips them entirely (no weights read).
            try:
                pipe = self.family.pipeline_class.from_pretrained(
                    self.path, transformer=None, vae=None, dtype=self.dtype, local_files_only=True
                )
            except (OSError, ValueError, RuntimeError) as e:  # a missing or damaged encoder, weights of another size
                raise ConfigError(
                    f"{self.key}: cannot load the text encoders of {self.path} ({first_line(e)})"
                ) from None
            self.pipe = pipe.to(self.device)
        return self.pipe

    @torch.no_grad()
    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled = self.family.encode_prompt(self.load(), prompts, self.device, self.max_sequence_length)
        return embeds.float().cpu(), pooled.float().cpu()

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from tqdm.auto import tqdm

        starts = range(0, len(prompts), self.batch_size)
        show = self.progress and len(starts) > 1  # no bar for the single negative prompt
        embeds, pooled = [], []
        for start in tqdm(
            starts, desc=f"encoding prompts ({self.family.name} text encoders)", unit="batch", disable=not show
        ):
            e, p = self._encode_batch(list(prompts[start : start + self.batch_size]))
            embeds.append(e)
            pooled.append(p)
        return torch.cat(embeds), torch.cat(pooled)

    def close(self) -> None:
        """Free the encoders (T5-XXL alone is ~9 GB in bf16): nothing of them stays resident while training. The
        pipeline's modules sit in reference cycles, so dropping the reference is not enough: collect now."""
        if self.pipe is not None:
            self.pipe = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # dropped without close() (trainer's encode_fn): free all the same
        self.close()


def pipeline_encoder(
    model_cfg: ModelConfig,
    family: Family,
    prompts_cfg: PromptsConfig | None = None,
    device=None,
    path: str | Path | None = None,
    key: str = "model.path",
):
    """(encode_fn, cache_name) for `prompts.encoder: pipeline`: the text encoders of the `family` pipeline at
    model.path, or at `path` (a teacher's own pipeline folder, named by the config key `key`), in the model's dtype.
    encode_fn loads them on first use; `with encode_fn:` (or dropping it) frees them."""
    path = model_cfg.path if path is None else path
    if path is None:
        raise ConfigError("prompts.encoder: 'pipeline' needs model.path, a local diffusers pipeline folder")
    prompts_cfg = prompts_cfg or PromptsConfig()
    encoder = PipelineTextEncoder(
        path,
        family,
        DTYPES[model_cfg.dtype],
        device,
        max_sequence_length=prompts_cfg.max_sequence_length,
        batch_size=prompts_cfg.encode_batch_size,
        key=key,
    )
    return encoder, encoder.name
