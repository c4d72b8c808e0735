"""Flow-matching pieces the demo's own stages share: the model, text conditioning, the sampler, the training loss,
and the compute meter that puts every method on one budget.

The sampler steps with transition_coefficients (opd_fast/ops/opd_step/naive.py) on the sigma grid of
opd_fast.schedule, i.e. the same transition math the trainer's rollouts use; velocities come from the SD3 family's
velocity (opd_fast.families.sd3).
"""

from __future__ import annotations

import torch

from opd_fast.families import get_family
from opd_fast.models import Conditioning
from opd_fast.ops.opd_step.naive import apply_cfg, transition_coefficients
from opd_fast.prompts import BuiltinTextEncoder
from opd_fast.schedule import sigma_grid

# A small SD3 transformer over the 16x16 RGB image itself: patch 2 -> 64 image tokens; in/out channels 3 (no VAE).
# `sampling.resolution: 128` in configs/demo.yaml makes the family's latent_shape give (3, 16, 16).
ARCH = dict(
    sample_size=16,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=64,
    pooled_projection_dim=32,
    pos_embed_max_size=16,
)
FAMILY = get_family("sd3")


def build_model(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FAMILY.transformer_class(**ARCH)


class TextConditioner:
    """Prompts -> Conditioning through the trainer's built-in encoder, with the same dimensions and token count, so
    a prompt conditions the demo's own stages exactly as it conditions the trainer."""

    def __init__(self, max_tokens: int):
        self.encoder = BuiltinTextEncoder(ARCH["joint_attention_dim"], ARCH["pooled_projection_dim"], max_tokens)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        negative_embeds, negative_pooled = self.encoder.encode([""])
        self.negative = (negative_embeds, negative_pooled)

    def __call__(self, prompts: list[str], device="cpu") -> Conditioning:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            embeds, pooled = self.encoder.encode(missing)
            self._cache.update({p: (embeds[i], pooled[i]) for i, p in enumerate(missing)})
        embeds = torch.stack([self._cache[p][0] for p in prompts]).to(device)
        pooled = torch.stack([self._cache[p][1] for p in prompts]).to(device)
        return Conditioning(embeds, pooled, self.negative[0].to(device), self.negative[1].to(device))


class ComputeMeter:
    """Counts transformer sample-passes: a forward of one sample is 1, its backward 2 (the usual 1:2 FLOP ratio).
    Budgets are set in these units, not seconds, so that equal-budget comparisons are deterministic."""

    def __init__(self):
        self.units = 0

    def forward(self, batch: int, passes: int = 1) -> None:
        self.units += batch * passes

    def train(self, batch: int, passes: int = 1) -> None:
        self.units += 3 * batch * passes


def sigmas(num_steps: int, shift: float) -> torch.Tensor:
    return sigma_grid(FAMILY, num_steps, shift)


@torch.no_grad()
def sample(
    model,
    cond: Conditioning,
    noise: torch.Tensor,
    grid: torch.Tensor,
    guidance: float | None = None,
    meter: ComputeMeter | None = None,
) -> torch.Tensor:
    """ODE rollout from noise (B, 3, 16, 16) over the whole sigma grid -> images in model space."""
    x = noise
    batch = x.shape[0]
    for j in range(len(grid) - 1):
        sigma, sigma_next = grid[j].expand(batch), grid[j + 1].expand(batch)
        v, cfg = FAMILY.velocity(model, x, sigma.to(x.device), cond, guidance)
        v = apply_cfg(v, cfg)
        x_coef, v_coef, _, _ = transition_coefficients(sigma, sigma_next, 0.0)
        x = x_coef.view(-1, 1, 1, 1).to(x.device) * x + v_coef.view(-1, 1, 1, 1).to(x.device) * v.float()
        if meter is not None:
            meter.forward(batch, 2 if cfg is not None else 1)
    return x


def flow_matching_loss(model, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss ||v(x_sigma) - (eps - x0)||^2 with SD3's logit-normal sigma sampling."""
    batch = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    sigma = torch.sigmoid(torch.randn(batch, generator=generator)).to(x0.device)
    x_sigma = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    v, _ = FAMILY.velocity(model, x_sigma, sigma, cond, None)
    return (v.float() - (eps - x0)).pow(2).mean()
