"""The sigma grid of a rollout (which of its steps are trained: RunConfig.trained_steps).

The grid comes from diffusers' FlowMatchEulerDiscreteScheduler, never re-derived: SD3 uses a static shift (3.0 for
SD3.5), FLUX the resolution-dependent dynamic shift its pipeline uses.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

# FLUX.1's scheduler config (scheduler/scheduler_config.json of the released pipeline)
FLUX_SHIFT = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def make_scheduler(family: str, shift: float) -> FlowMatchEulerDiscreteScheduler:
    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, **FLUX_SHIFT)
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def sigma_grid(family: str, num_steps: int, shift: float, image_seq_len: int | None = None) -> torch.Tensor:
    """(num_steps + 1,) float32 sigmas from 1 down to 0, as the family's pipeline would sample them."""
    scheduler = make_scheduler(family, shift)
    if family == "flux":
        if image_seq_len is None:
            raise ValueError("sigma_grid: FLUX's dynamic shift needs image_seq_len")
        c = FLUX_SHIFT
        slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        mu = image_seq_len * slope + c["base_shift"] - slope * c["base_image_seq_len"]
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    else:
        scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float()

