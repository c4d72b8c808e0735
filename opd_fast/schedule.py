"""The sigma grid of a rollout (which of its steps are trained: RunConfig.trained_steps).

The grid comes from diffusers' FlowMatchEulerDiscreteScheduler, never re-derived, built from the model's own scheduler
config (scheduler/scheduler_config.json of the pipeline at model.path) and called the way the family's pipeline calls
it (Family.set_timesteps), with the image-size dependent `mu` when the config shifts dynamically. Without a pipeline
folder the family's released config stands in (Family.scheduler_config). A `sampling.shift` in the run config
replaces the config's shift with that static one.

The scheduler class is the config's own (`_class_name`): the flow-matching Euler scheduler of SD3, FLUX, Qwen-Image
and Z-Image, or Wan's UniPC multistep scheduler with flow sigmas (its `flow_shift` is the shift). Only its sigmas
are used: the rollout steps them with the OPD transition (Euler or the Flow-GRPO SDE), not with the scheduler's
integrator.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from opd_fast.config import ConfigError

if TYPE_CHECKING:
    from opd_fast.families.base import Family

log = logging.getLogger(__name__)
# scheduler class -> the config key of its static shift
SHIFT_KEYS = {FlowMatchEulerDiscreteScheduler: "shift", UniPCMultistepScheduler: "flow_shift"}


def scheduler_config_file(path: str | Path) -> Path | None:
    """The scheduler config of the pipeline at `path`: path/scheduler/, or the pipeline's when `path` is its
    transformer/ folder; None when there is none (a lone transformer folder)."""
    path = Path(path)
    folders = [path] + ([path.parent] if (path / "config.json").is_file() else [])
    for folder in folders:
        file = folder / "scheduler" / "scheduler_config.json"
        if file.is_file():
            return file
    return None


def make_scheduler(family: Family, shift: float | None = None, path: str | Path | None = None):
    """The family's FlowMatchEulerDiscreteScheduler: the config at `path` if it has one, else the released one;
    `shift` (when not None) makes it a static shift."""
    config, source = dict(family.scheduler_config), f"the released {family.name} config"
    file = scheduler_config_file(path) if path is not None else None
    if file is not None:
        try:
            config, source = json.loads(file.read_text()), str(file)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.path: {file} is not valid JSON ({e})") from e
    name = config.get("_class_name", FlowMatchEulerDiscreteScheduler.__name__)
    cls = next((c for c in SHIFT_KEYS if c.__name__ == name), None)
    if cls is None or (cls is UniPCMultistepScheduler and not config.get("use_flow_sigmas")):
        raise ConfigError(
            f"model.path: the scheduler of {source} is {name}"
            f"{' without flow sigmas' if cls is not None else ''}; the rollout needs flow-matching sigmas "
            f"({' or '.join(c.__name__ for c in SHIFT_KEYS)} with use_flow_sigmas)"
        )
    if shift is not None:
        config.update({SHIFT_KEYS[cls]: shift, "use_dynamic_shifting": False})
        source += f", sampling.shift {shift}"
    log.info("sigma schedule: %s", source)
    return cls.from_config(config)


def sigma_grid(
    family: Family,
    num_steps: int,
    shift: float | None = None,
    image_seq_len: int | None = None,
    path: str | Path | None = None,
) -> torch.Tensor:
    """(num_steps + 1,) float32 sigmas from 1 down to 0, as the family's pipeline would sample them.

    image_seq_len: the transformer's image tokens (after patchifying), needed when the schedule shifts dynamically.
    """
    scheduler = make_scheduler(family, shift, path)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting"):
        if image_seq_len is None:
            raise ValueError(f"sigma_grid: the {family.name} scheduler shifts dynamically and needs image_seq_len")
        c = {key: scheduler.config.get(key, default) for key, default in family.mu_defaults.items()}
        kwargs["mu"] = calculate_shift(
            image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"]
        )
    family.set_timesteps(scheduler, num_steps, **kwargs)
    return family.rollout_grid(scheduler.sigmas.float())
