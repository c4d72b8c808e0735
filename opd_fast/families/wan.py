"""Wan 2.1 and 2.2 text-to-video: state x is the 5-D video latent (B, C, F, H, W), F = (frames - 1) / 4 + 1 latent
frames. Text: UMT5 (the pipeline pads every prompt to max_sequence_length with zeros and feeds no mask; the second
text tensor is the token mask, for the record). CFG as one [uncond; cond] batch that opd_step combines, as SD3. The
sigma grid is the released UniPC scheduler's flow sigmas with its static `flow_shift`; the rollout steps them with
the OPD transition.

The per-step KL sums (or, with loss.reduction mean, averages) over every latent element of a sample, frames
included: opd_step flattens each sample whatever its rank (tests/test_families.py holds it to a float64 twin).

Wan 2.2's two-expert pipelines (A14B: `transformer` for high noise, `transformer_2` for low noise, switched at
boundary_ratio * num_train_timesteps) load as one module, WanExperts, that routes every sample to its expert by its
timestep, as WanPipeline does; students (a LoRA on both experts, or all weights) and teachers are such modules, and
the LoRA export is one diffusers file per expert (the second in transformer_2/, for load_into_transformer_2=True).
student.guidance_2 / teacher.guidance_2 is WanPipeline's guidance_scale_2, the low-noise expert's CFG scale
(default: guidance), applied as the pipeline applies it. The TI2V model (expand_timesteps) is not supported yet: a
ConfigError before any model loads."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar, NamedTuple

import torch
from diffusers import WanTransformer3DModel

from opd_fast.config import ConfigError
from opd_fast.families.base import Family, model_dtype, unnormalise_latents

# UniPC nudges a first sigma of 1 to 1 - 1e-6 (its multistep update takes log(alpha)); the OPD transition's
# sigma == 1 rule (the SDE's std at the first step) needs the exact 1 back. The transformer still sees the
# pipeline's timestep there: 999.
FIRST_SIGMA_EPS = 1e-6
EXPERTS_FILE = "wan_experts.json"  # a two-expert full student's export: its boundary, beside transformer{,_2}/
EXPERTS = ("transformer", "transformer_2")  # high noise, low noise: WanPipeline's component names


class ExpertGuidance(NamedTuple):
    """A two-expert model's CFG scales: WanPipeline's guidance_scale (the high-noise expert's) and guidance_scale_2
    (the low-noise expert's). CFG runs in both experts or in neither: the pipeline decides by guidance_scale > 1."""

    high: float | None
    low: float


class WanExperts(torch.nn.Module):
    """Wan 2.2's two experts as one model: `transformer` (high noise) and `transformer_2` (low noise). forward takes
    WanTransformer3DModel's arguments and sends each sample to its expert as WanPipeline does: transformer where
    its timestep t >= boundary_ratio * num_train_timesteps, else transformer_2 (a batch on both sides runs each
    expert on its rows). Module names carry the expert's component name (transformer_2.blocks.0.attn1.to_q), so a
    LoRA of the module covers both experts and the export can split it per component."""

    lora_components = EXPERTS  # one diffusers LoRA file per component (opd_fast.teachers reads them so)
    # which expert runs depends on the timestep's value, not on the input's shape: a CUDA graph captured at one step
    # would replay that step's expert at every step (opd_fast.teachers refuses teacher_runtime.cuda_graphs)
    routes_by_timestep = True
    _keep_in_fp32_modules = WanTransformer3DModel._keep_in_fp32_modules  # model_dtype looks past them

    def __init__(self, transformer, transformer_2, boundary_ratio: float, num_train_timesteps: int = 1000):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_ratio = float(boundary_ratio)
        self.num_train_timesteps = int(num_train_timesteps)

    @property
    def config(self):
        """The high-noise expert's config: the latent space, text width and folder the run reads (both experts
        share the first two: checked when they load)."""
        return self.transformer.config

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * self.num_train_timesteps  # WanPipeline.__call__'s boundary_timestep

    def high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples the high-noise expert denoises (WanPipeline: t >= boundary_timestep)."""
        return timestep >= self.boundary_timestep

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict: bool = True, **kwargs):
        high = self.high_noise(timestep)
        count = int(high.sum())  # one host sync: which experts run decides which kernels are launched
        if count in (0, len(high)):
            expert = self.transformer if count else self.transformer_2
            return expert(hidden_states, timestep, encoder_hidden_states, return_dict=return_dict, **kwargs)
        parts = [
            expert(hidden_states[rows], timestep[rows], encoder_hidden_states[rows], return_dict=False, **kwargs)[0]
            for expert, rows in ((self.transformer, high), (self.transformer_2, ~high))
        ]
        v = parts[0].new_empty((len(high),) + parts[0].shape[1:])
        v[high], v[~high] = parts  # index assignment into a fresh tensor: autograd reaches both experts
        if not return_dict:
            return (v,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=v)

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """A peft LoRA on the matching modules of both experts, as diffusers' ModelMixin.add_adapter adds one to a
        transformer."""
        from peft import inject_adapter_in_model

        configs = getattr(self, "peft_config", {})
        if adapter_name in configs:
            raise ValueError(f"Adapter with name {adapter_name} already exists")
        adapter_config.base_model_name_or_path = None
        inject_adapter_in_model(adapter_config, self, adapter_name)
        self.peft_config = {**configs, adapter_name: adapter_config}  # after: peft warns of one it finds before

    def enable_gradient_checkpointing(self) -> None:
        for expert in (self.transformer, self.transformer_2):
            expert.enable_gradient_checkpointing()

    def save_pretrained(self, folder, **kwargs) -> None:
        """folder/transformer and folder/transformer_2 (diffusers transformer folders, the pipeline's layout) and
        folder/wan_experts.json (the boundary): Wan.load_pretrained reads it back as the two experts."""
        folder = Path(folder)
        for name in EXPERTS:
            getattr(self, name).save_pretrained(folder / name, **kwargs)
        boundary = dict(boundary_ratio=self.boundary_ratio, num_train_timesteps=self.num_train_timesteps)
        (folder / EXPERTS_FILE).write_text(json.dumps(boundary))


def _experts_of(folder: Path) -> tuple[Path, float, int] | None:
    """(root, boundary_ratio, num_train_timesteps) when the transformer folder `folder` is one of two experts: a
    Wan 2.2 pipeline folder (model_index.json with transformer_2 and boundary_ratio) or a two-expert export
    (wan_experts.json), the folder itself or the one it sits in; else None."""
    for root in (folder, folder.parent):
        if (root / EXPERTS_FILE).is_file() and (root / "transformer_2" / "config.json").is_file():
            boundary = json.loads((root / EXPERTS_FILE).read_text())
            return root, boundary["boundary_ratio"], boundary["num_train_timesteps"]
        index = root / "model_index.json"
        if index.is_file():
            config = json.loads(index.read_text())
            if (config.get("transformer_2") or [None])[0] is None or config.get("boundary_ratio") is None:
                return None  # WanPipeline's rule: without a boundary, `transformer` alone denoises every step
            scheduler = root / "scheduler" / "scheduler_config.json"
            steps = json.loads(scheduler.read_text()).get("num_train_timesteps", 1000) if scheduler.is_file() else 1000
            return root, config["boundary_ratio"], steps
    return None


class Wan(Family):
    name = "wan"
    transformer_class = WanTransformer3DModel
    pipeline_class_name = "WanPipeline"
    tiny_preset = "tiny-wan"
    num_frames = 81  # WanPipeline's default video length (5 s at 16 fps): 21 latent frames
    vae_temporal = 4  # frames per latent frame of the Wan VAE (after the first)
    presets: ClassVar[dict[str, dict]] = {
        # CPU-sized: builds in milliseconds.
        "tiny-wan": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
        ),
        # A larger tiny of the same latent space: the cross-size teacher of the tests (as 14B teaches 1.3B).
        "tiny-wan-large": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=3,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=32,
            ffn_dim=72,
            num_layers=3,
        ),
        # Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers transformer/config.json, for random-weight benchmarks.
        "wan2.1-t2v-1.3b": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
        ),
        "wan2.1-t2v-14b": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
        ),
    }
    arch_keys = (
        "patch_size",
        "num_attention_heads",
        "attention_head_dim",
        "in_channels",
        "out_channels",
        "text_dim",
        "freq_dim",
        "ffn_dim",
        "num_layers",
        "qk_norm",
        "cross_attn_norm",
        "image_dim",
        "added_kv_proj_dim",
    )
    latent_keys = ("in_channels", "out_channels", "patch_size")
    vae_keys = ("z_dim", "latents_mean", "latents_std", "temperal_downsample")
    # the time embedder's weight dtype sets its input's (read as a weight); a two-expert model's names carry the
    # expert (transformer_2.condition_embedder...), and its top-level proj_out is not fp8.DEFAULT_SKIP's "proj_out"
    fp8_keep = ("condition_embedder.*", "transformer*.condition_embedder.*", "transformer*.proj_out")
    lora_targets = tuple(
        f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
    )
    text_components = ("text_encoder", "tokenizer")
    default_max_sequence_length = 512  # WanPipeline.__call__'s default
    mu_defaults: ClassVar[dict] = {}
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (flow_shift 3.0: 480p; Wan uses 5.0 at 720p)
    scheduler_config: ClassVar[dict] = dict(
        _class_name="UniPCMultistepScheduler",
        beta_end=0.02,
        beta_schedule="linear",
        beta_start=0.0001,
        final_sigmas_type="zero",
        flow_shift=3.0,
        lower_order_final=True,
        num_train_timesteps=1000,
        predict_x0=True,
        prediction_type="flow_prediction",
        solver_order=2,
        solver_type="bh2",
        timestep_spacing="linspace",
        use_flow_sigmas=True,
    )

    def for_run(self, sampling) -> Wan:
        frames = sampling.num_frames
        if frames is None or frames == self.num_frames:
            return self
        if (frames - 1) % self.vae_temporal:
            raise ConfigError(
                f"sampling.num_frames: the Wan VAE encodes 1 + {self.vae_temporal}k frames (81, 49, 5, ...); "
                f"got {frames}"
            )
        twin = copy.copy(self)
        twin.num_frames = frames
        return twin

    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.vae_temporal + 1

    def latent_shape(self, model, batch: int, resolution: int) -> tuple[int, ...]:
        side = resolution // self.vae_scale
        return (batch, model.config.in_channels, self.latent_frames(), side, side)

    def image_tokens(self, model, resolution: int) -> int:
        frames, height, width = model.config.patch_size
        side = resolution // self.vae_scale
        return (self.latent_frames() // frames) * (side // height) * (side // width)

    def text_widths(self, model) -> tuple[int, int]:
        return model.config.text_dim, 0

    @staticmethod
    def pipeline_timestep(sigma: torch.Tensor) -> torch.Tensor:
        """The pipeline's timestep: the scheduler's int64 sigma * 1000 (truncated), 999 at the first step."""
        return (sigma.double().clamp(max=1 - FIRST_SIGMA_EPS) * 1000).long()

    def guidance(self, model, guidance, guidance_2, key):
        if guidance_2 is None:
            return guidance
        if not isinstance(getattr(model, "module", model), WanExperts):
            raise ConfigError(
                f"{key}: the low-noise expert's guidance (WanPipeline's guidance_scale_2) needs a Wan 2.2 two-expert "
                "model; this one has one transformer"
            )
        return ExpertGuidance(guidance, guidance_2)

    def _expert_velocity(self, model, x, sigma, cond, guidance: ExpertGuidance):
        """A two-expert model at (guidance_scale, guidance_scale_2): each sample's CFG scale is its expert's. A batch
        on one side of the boundary (the trainer's: one step's sigma) hands opd_step that scale; a batch on both
        sides is combined here, per sample."""
        if guidance.high is None or guidance.high <= 1.0:  # WanPipeline.do_classifier_free_guidance
            return self.velocity(model, x, sigma, cond, None)
        v, _ = self.velocity(model, x, sigma, cond, guidance.high)  # [uncond; cond], one batch
        high = getattr(model, "module", model).high_noise(self.pipeline_timestep(sigma))  # DDP / DeepSpeed: .module
        count = int(high.sum())
        if count in (0, len(high)):
            return v, (guidance.high if count else guidance.low)
        scale = torch.where(high, guidance.high, guidance.low).to(v.dtype).view((-1,) + (1,) * (x.dim() - 1))
        uncond, conditional = v.chunk(2)
        return uncond + scale * (conditional - uncond), None

    @torch.no_grad()
    def decode_latents(self, pipe, latents, resolution):
        # WanPipeline's tail: un-normalise, decode the video, its frames as PIL images; then the film strips
        video = pipe.vae.decode(unnormalise_latents(pipe.vae, latents), return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="pil")
        return self.output_images(SimpleNamespace(frames=frames))

    def velocity(self, model, x, sigma, cond, guidance):
        if isinstance(guidance, ExpertGuidance):
            return self._expert_velocity(model, x, sigma, cond, guidance)
        dtype = model_dtype(model)
        use_cfg = guidance is not None and guidance > 1.0  # WanPipeline.do_classifier_free_guidance
        embeds, xs, t = cond.prompt_embeds, x, sigma
        if use_cfg:
            embeds = torch.cat([cond.negative_embeds.expand_as(embeds), embeds])
            xs, t = torch.cat([x, x]), torch.cat([sigma, sigma])
        timestep = self.pipeline_timestep(t)
        v = model(
            hidden_states=xs.to(dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.to(dtype),
            return_dict=False,
        )[0]
        return v, (guidance if use_cfg else None)

    def set_timesteps(self, scheduler, num_steps: int, **mu) -> None:
        scheduler.set_timesteps(num_steps, **mu)  # WanPipeline: set_timesteps(num_inference_steps)

    def rollout_grid(self, sigmas: torch.Tensor) -> torch.Tensor:
        if abs(float(sigmas[0]) - 1) <= 2 * FIRST_SIGMA_EPS:
            sigmas = sigmas.clone()
            sigmas[0] = 1.0
        return sigmas

    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int):
        embeds, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device
        )
        # the pipeline already pads with zeros to max_sequence_length; the mask records the prompt's tokens
        return embeds, (embeds.abs().sum(-1) > 0).float()

    def text_tokens(self, max_sequence_length: int | None = None) -> int:
        return max_sequence_length or self.default_max_sequence_length

    def sampling_inputs(self, embeds, pooled, negative_embeds, negative_pooled, guidance) -> dict:
        batch = embeds.shape[0]
        scales = dict(guidance_scale=guidance)
        if isinstance(guidance, ExpertGuidance):
            scales = dict(guidance_scale=guidance.high, guidance_scale_2=guidance.low)
        return dict(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative_embeds.expand(batch, -1, -1),
            num_frames=self.num_frames,
            **scales,
        )

    def output_images(self, output) -> list:
        """One PNG per video: its frames side by side (a film strip), so sample folders and `eval` stay images."""
        from PIL import Image

        strips = []
        for frames in output.frames:
            w, h = frames[0].size
            strip = Image.new("RGB", (w * len(frames), h))
            for i, frame in enumerate(frames):
                strip.paste(frame, (i * w, 0))
            strips.append(strip)
        return strips

    def check_pipeline_folder(self, folder) -> None:
        index = self.read_json(folder / "model_index.json")
        if index.get("expand_timesteps"):
            raise self.unsupported(f"{folder} is a Wan 2.2 TI2V pipeline (expand_timesteps): not supported yet")
        present = [(index.get(name) or [None])[0] is not None for name in EXPERTS]
        if index.get("boundary_ratio") is not None and not all(present):
            missing = [name for name, there in zip(EXPERTS, present) if not there]
            raise self.unsupported(
                f"{folder} sets boundary_ratio {index['boundary_ratio']} but has no {' / '.join(missing)}: "
                "WanPipeline switches between two experts there"
            )

    def load_pretrained(self, folder, dtype):
        folder = Path(folder)
        experts = _experts_of(folder)
        if experts is None:
            return super().load_pretrained(folder, dtype)
        root, boundary_ratio, steps = experts
        high, low = (super(Wan, self).load_pretrained(root / name, dtype) for name in EXPERTS)
        keys = self.latent_keys + ("text_dim",)
        differ = [k for k in keys if high.config.get(k) != low.config.get(k)]
        if differ:
            raise ConfigError(f"model.path: the two experts of {root} differ in {', '.join(differ)}")
        return WanExperts(high, low, boundary_ratio, steps)

    def pipeline_model(self, pipe):
        if getattr(pipe, "transformer_2", None) is None or pipe.config.boundary_ratio is None:
            return pipe.transformer
        steps = pipe.scheduler.config.num_train_timesteps
        return WanExperts(pipe.transformer, pipe.transformer_2, pipe.config.boundary_ratio, steps)

    def set_pipeline_model(self, pipe, model):
        if not isinstance(model, WanExperts):
            pipe.transformer = model
            return
        if getattr(pipe, "transformer_2", None) is None or pipe.config.boundary_ratio != model.boundary_ratio:
            raise ConfigError(
                f"a two-expert model (boundary_ratio {model.boundary_ratio}) goes into a Wan 2.2 pipeline of the "
                f"same boundary, not one of boundary_ratio {pipe.config.boundary_ratio}"
            )
        pipe.transformer, pipe.transformer_2 = model.transformer, model.transformer_2

    def pipeline_components(self, model):
        if isinstance(model, WanExperts):
            return {"transformer": model.transformer, "transformer_2": model.transformer_2}
        return {"transformer": model}

    def save_lora(self, folder, state, metadata) -> None:
        """A two-expert student's LoRA as WanPipeline loads it: the high-noise expert's file in `folder`
        (pipe.load_lora_weights(folder)), the low-noise expert's in folder/transformer_2
        (pipe.load_lora_weights(folder / "transformer_2", load_into_transformer_2=True)); alpha in both."""
        if not any(k.startswith("transformer_2.") for k in state):
            return super().save_lora(folder, state, metadata)
        for name, target in zip(EXPERTS, (Path(folder), Path(folder) / "transformer_2")):
            part = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
            super().save_lora(target, part, metadata)

    def load_lora_into_pipeline(self, pipe, folder) -> None:
        second = Path(folder) / "transformer_2"
        if not second.is_dir():
            return super().load_lora_into_pipeline(pipe, folder)
        if getattr(pipe, "transformer_2", None) is None:
            raise ConfigError(f"{folder}: a LoRA of two experts, but the pipeline has no transformer_2")
        pipe.load_lora_weights(folder)
        pipe.load_lora_weights(second, load_into_transformer_2=True)
        pipe.fuse_lora(components=list(EXPERTS))

    def tiny_pipeline(self, transformer, parts):
        """UMT5 of d_model 32 = text_dim; a Wan VAE of 4 latent channels = in_channels."""
        from diffusers import UniPCMultistepScheduler

        tokenizer = parts.t5_tokenizer()
        return self.pipeline_class(
            transformer=transformer,
            scheduler=UniPCMultistepScheduler.from_config(self.scheduler_config),
            vae=parts.wan_vae(1),
            text_encoder=parts.umt5_model(tokenizer, 2),
            tokenizer=tokenizer,
        )


FAMILY = Wan()
