"""TeachTrainer: one task's teacher trained by Flow-GRPO or DiffusionNFT, with the OPD trainer's run around it.

It IS an opd_fast.trainer.Trainer whose round is a stage-1 round, so the run folder (lock, claim, run.json), the
checkpoints (manifests, verified resume, last K kept, only good states), fit()'s loop, metrics.jsonl, the trackers
and the export (OUT/lora_diffusers, OUT/lora_diffusers_ema: the layout a run config's teacher `path` reads) are the
trainer's own. Its parts are opd_fast.run's (build_run with no teachers): the same engines, EMA, prompts and sigmas.

A round, as the methods read:
    prompts      rollout.prompts_per_round prompts (per rank), each repeated rollout.group_size times
    rollout      the student samples every prompt (no grad) with opd_step (its log_prob for GRPO's trained steps)
    reward       the final states become images (task.images), the task's reward scores them, and each group's
                 rewards become advantages
    train        GRPO: at every trained step, the student's velocity at the stored state, opd_step's log-density of
                 the stored next state (and its KL to the reference), the clipped-ratio loss; NFT: at nft.timesteps
                 noise levels per sample, the implicit positive / negative loss on the clean final state
    step         ONE optimizer step (the engine), then the EMA, as an OPD round

Stage-1 statistics (the round's reward mean and spread; GRPO's ratio and clipped share) join each round's record in
OUT/metrics.jsonl and the trackers (RoundResult.extra), beside the trainer's loss, grad_norm, lr and seconds.
"""

from __future__ import annotations

import contextlib

import torch

from opd_fast import distributed
from opd_fast.families import family_for_run
from opd_fast.models import student_forward_context
from opd_fast.ops import LossSpec
from opd_fast.ops.opd_step.naive import apply_cfg, transition_coefficients
from opd_fast.prompts import to_device
from opd_fast.run import build_run
from opd_fast.run_folder import RunFolder
from opd_fast.stage1 import flow_grpo, nft
from opd_fast.stage1.config import TeachConfig
from opd_fast.stage1.rewards import ImageDecoder, build_task_reward
from opd_fast.trackers import check_trackers
from opd_fast.trainer import RoundResult, Trainer, _seed


class TeachTrainer(Trainer):
    """Trainer with stage-1 rounds. TeachTrainer.build(cfg, out_dir) opens the folder, builds the parts (no
    teachers), the reward and the image decoder."""

    def __init__(self, cfg: TeachConfig, parts, out_dir, *, reward, decoder, **kwargs):
        super().__init__(cfg, parts, out_dir, **kwargs)
        self.reward, self.decoder = reward, decoder
        grpo = cfg.method == "grpo"
        options = dict(backend=cfg.loss.backend, log_prob=grpo)
        if grpo:
            options.update(kl_normalization=cfg.grpo.kl_normalization, reduction=cfg.grpo.reduction)
        self.sde = LossSpec.resolve(cfg.sampling.noise_level, self.device, **options)
        self.ode = LossSpec.resolve(0.0, self.device, backend=self.sde.backend, log_prob=grpo)
        self.backend = self.sde.backend
        self.stats: dict = {}  # the latest round's statistics (its record's extra keys)

    @classmethod
    def build(cls, cfg: TeachConfig, out_dir, *, resume=False, device=None, hooks=(), timer=None) -> TeachTrainer:
        family = family_for_run(cfg)
        check_trackers(cfg.logging)
        dist = distributed.setup(cfg.engine, device)
        folder = RunFolder(out_dir, dist).open(cfg, resume)
        try:
            # a missing reward package, server or VAE fails before the student loads
            reward = build_task_reward(cfg.task.reward, dist.device)
            decoder = ImageDecoder(
                cfg.task.images, cfg.eval.pipeline or cfg.model.path, dist.device, family, cfg.sampling.resolution
            )
            parts = build_run(cfg, out_dir, dist, teachers={})
        except BaseException:
            folder.release()
            raise
        return cls(
            cfg, parts, out_dir, reward=reward, decoder=decoder, resume=resume, hooks=hooks, timer=timer, folder=folder
        )

    # -- the round's data ------------------------------------------------------------------------------------------
    def round_prompts(self, round_idx: int) -> torch.Tensor:
        """This rank's prompt indices, each repeated group_size times (a group's samples side by side)."""
        rollout, world, rank = self.cfg.rollout, self.dist.world_size, self.dist.rank
        n = len(self.prompts[self.cfg.task.name].prompts)
        g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, round_idx, 0, 2))
        total = rollout.prompts_per_round * world
        idx = torch.randperm(n, generator=g)[:total] if total <= n else torch.randint(n, (total,), generator=g)
        mine = idx[rank * rollout.prompts_per_round : (rank + 1) * rollout.prompts_per_round]
        return mine.repeat_interleave(rollout.group_size)

    def _noise(self, round_idx: int, first: int, count: int, shape) -> torch.Tensor:
        """(steps + 1, count, ...): each sample's initial latent and step noises, seeded per global sample."""
        per_sample = []
        for i in range(count):
            g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, round_idx, 0, 1, first + i))
            per_sample.append(torch.randn((self.cfg.sampling.num_steps + 1,) + tuple(shape[1:]), generator=g))
        return to_device(torch.stack(per_sample, 1), self.device)

    def _is_sde(self, j: int) -> bool:
        if self.cfg.method == "nft" or self.cfg.grpo.window is None:
            return True
        start, stop = self.cfg.sde_window()
        return start <= j < stop

    @contextlib.contextmanager
    def _reference_policy(self):
        """The reference policy: the base, i.e. the student with its LoRA switched off (no gradient)."""
        self.student.disable_adapters()
        try:
            with torch.no_grad():
                yield
        finally:
            self.student.enable_adapters()

    def _reference_velocity(self, x, sigma, cond, guidance):
        with self._reference_policy(), student_forward_context(self.student, self.student_autocast):
            return self.family.velocity(self.student, x, sigma, cond, guidance)

    # -- the rollout -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, cond, noise) -> dict:
        """The student's trajectory from noise[0] over the whole grid; GRPO keeps its trained states, their next
        states' log-densities and (GRPO-Guard) the velocities."""
        grpo = self.cfg.method == "grpo"
        start, stop = self.cfg.sde_window() if grpo else (0, 0)
        batch = noise.shape[1]
        sigmas = self._sigma_rows(batch)
        x, states, log_probs, velocities = noise[0], [], [], []
        for j in range(self.cfg.sampling.num_steps):
            v, guided = self._student_velocity(x, sigmas[j], cond, with_grad=False)
            spec = self.sde if self._is_sde(j) else self.ode
            trained = grpo and start <= j < stop
            out = spec.step(
                x, v, None, noise[j + 1], sigmas[j], sigmas[j + 1], student_guidance=guided, log_prob=trained
            )
            if trained:
                states.append(x)
                log_probs.append(out[2])
                if self.cfg.grpo.ratio_norm:
                    velocities.append(apply_cfg(v, guided).float())
            x = out[0]
            if trained and j + 1 == stop:
                states.append(x)
        return {"final": x, "states": states, "log_probs": log_probs, "velocities": velocities}

    # -- training --------------------------------------------------------------------------------------------------
    def _grpo_backward(self, data: dict, cond, noise, advantages, scale: float) -> tuple[torch.Tensor, dict]:
        cfg, grpo = self.cfg, self.cfg.grpo
        start, stop = cfg.sde_window()
        sigmas = self._sigma_rows(noise.shape[1])
        total = torch.zeros(noise.shape[1], device=self.device)
        ratios, clipped = [], []
        for k, j in enumerate(range(start, stop)):
            x, x_next = data["states"][k], data["states"][k + 1]
            v, guided = self._student_velocity(x, sigmas[j], cond, with_grad=True)
            v_ref, ref_guided = None, None
            if grpo.kl_beta > 0:
                v_ref, ref_guided = self._reference_velocity(x, sigmas[j], cond, self.student_guidance)
            _, kl, log_prob = self.sde.step(
                x,
                v,
                v_ref,
                noise[j + 1],
                sigmas[j],
                sigmas[j + 1],
                student_guidance=guided,
                teacher_guidance=ref_guided,
                log_prob=True,
                sample=x_next,
            )
            old = data["log_probs"][k]
            _, v_coef, sbar, _ = transition_coefficients(sigmas[j], sigmas[j + 1], cfg.sampling.noise_level)
            if grpo.ratio_norm:
                shift = flow_grpo.mean_shift(v_coef, apply_cfg(v, guided), data["velocities"][k], sbar, grpo.reduction)
                log_prob, old = flow_grpo.guard_log_ratio(log_prob, old, shift, sbar), torch.zeros_like(old)
            policy, ratio, was_clipped = flow_grpo.clipped_loss(
                log_prob, old, advantages, grpo.clip_range, grpo.adv_clip_max
            )
            if grpo.ratio_norm:
                policy = policy / (sigmas[j] - sigmas[j + 1])
            loss = policy + grpo.kl_beta * kl
            with self._phase("backward"):
                self.engine.backward(loss.sum() * scale)
            total += loss.detach()
            ratios.append(ratio.detach())
            clipped.append(was_clipped.float())
        stats = {"ratio": torch.cat(ratios), "clipped": torch.cat(clipped)}
        return total / (stop - start), stats

    def _nft_backward(self, final, cond, advantages, first: int, scale: float) -> tuple[torch.Tensor, dict]:
        cfg, settings = self.cfg, self.cfg.nft
        batch = final.shape[0]
        r = nft.optimality(advantages, settings.adv_clip_max)
        total = torch.zeros(batch, device=self.device)
        for k in range(settings.timesteps):
            picks, eps = [], []
            for i in range(batch):  # seeded per (round, sample, k): the split over ranks changes nothing
                g = torch.Generator().manual_seed(_seed(cfg.train.seed, self.round, 0, 3, first + i, k))
                picks.append(int(torch.randint(cfg.sampling.num_steps, (1,), generator=g)))
                eps.append(torch.randn(final.shape[1:], generator=g))
            t = self.sigmas[picks].to(self.device)
            eps = to_device(torch.stack(eps), self.device)
            tt = t.view((-1,) + (1,) * (final.dim() - 1))
            x_t = (1 - tt) * final + tt * eps
            v, guided = self._student_velocity(x_t, t, cond, with_grad=True)
            v = apply_cfg(v, guided)
            loss = nft.nft_loss(v, v.detach(), x_t, final, t, r, settings.beta, settings.adv_clip_max)
            if settings.kl_beta > 0:
                v_ref = apply_cfg(*self._reference_velocity(x_t, t, cond, self.student_guidance))
                loss = loss + settings.kl_beta * (v.float() - v_ref.float()).flatten(1).pow(2).mean(1)
            with self._phase("backward"):
                self.engine.backward(loss.sum() * scale)
            total += loss.detach()
        return total / settings.timesteps, {}

    def train_round(self, step: bool = True) -> RoundResult:
        """One stage-1 round (module docstring): rollouts, rewards, advantages, every micro-batch's backward calls,
        ONE optimizer step and the EMA."""
        for hook in self.hooks:
            hook.before_round(self, self.round)
        cfg, mb = self.cfg, self.cfg.train.micro_batch_size
        name = cfg.task.name
        prompts = self.prompts[name]
        indices = self.round_prompts(self.round)
        count = len(indices)
        shape = self.family.latent_shape(self.student, mb, cfg.sampling.resolution)
        first = self.dist.rank * count
        with self._phase("rollout"):
            rollouts = []
            for start in range(0, count, mb):
                cond = prompts.conditioning(indices[start : start + mb], self.device)
                noise = self._noise(self.round, first + start, mb, shape)
                rollouts.append((cond, noise, self.rollout(cond, noise)))
        with self._phase("reward"):
            finals = torch.cat([data["final"] for _, _, data in rollouts])
            texts = [prompts.prompts.prompts[i] for i in indices.tolist()]
            metadata = [prompts.prompts.metadata[i] if prompts.prompts.metadata else {} for i in indices.tolist()]
            mine = torch.tensor(self.reward.score(self.decoder(finals), texts, metadata), dtype=torch.float32)
            # every rank's rewards, in rank order: global_std is the round's spread, not this rank's share of it
            rewards = mine if self.dist.world_size == 1 else distributed.all_gather_flat(mine, self.dist).cpu()
            global_std = cfg.method == "grpo" and cfg.grpo.global_std
            advantages = flow_grpo.group_advantages(rewards, cfg.rollout.group_size, global_std)
            advantages = advantages[self.dist.rank * count : (self.dist.rank + 1) * count].to(self.device)
        scale = 1.0 / (count * cfg.trained_per_sample())
        losses, ratios, clipped = [], [], []
        for m, (cond, noise, data) in enumerate(rollouts):
            adv = advantages[m * mb : (m + 1) * mb]
            if cfg.method == "grpo":
                loss, stats = self._grpo_backward(data, cond, noise, adv, scale)
                ratios.append(stats["ratio"])
                clipped.append(stats["clipped"])
            else:
                loss, _ = self._nft_backward(data["final"], cond, adv, first + m * mb, scale)
            losses.append(loss)
        loss = float(self.engine.average(torch.cat(losses).mean()))
        # the round's reward mean and spread; this rank's ratio and clipped share
        self.stats = {"reward": float(rewards.mean()), "reward_std": float(rewards.std())}
        if ratios:
            ratio = torch.cat(ratios)
            self.stats.update(ratio_mean=float(ratio.mean()), ratio_max_dev=float((ratio - 1).abs().max()))
            self.stats["clipped"] = float(torch.cat(clipped).mean())
        return RoundResult(loss, {name: loss}, self._finish_round(loss, step), extra=dict(self.stats))
