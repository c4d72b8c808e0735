"""Multi-task on-policy distillation, one round at a time.

A round, as the method reads: for each task (round-robin), for each micro-batch of that task's prompts, the
student rolls out its own trajectory; at every trained state the task's teacher gives its velocity, the fused
step/KL op turns the two into the loss and the next state, and the loss is backpropagated at once (gradients
accumulate). After all tasks: ONE optimizer step, then EMA.

Schedules: "one_pass" (default) trains while it rolls out: the weights are fixed within a round, so the forward
that produces x_{j+1} is the one that is trained. "two_pass" is the official order: roll out without grad, then
recompute every trained state's forward with grad. Both give the same gradient (tests/test_trainer.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd_fast import distributed, faults
from opd_fast.checkpoint import (
    CheckpointError,
    checkpoint_path,
    checkpoint_step,
    export_diffusers_lora,
    flatten_optimizer_state,
    list_checkpoints,
    load_checkpoint,
    newest_verified,
    save_checkpoint,
    unflatten_optimizer_state,
    verify_checkpoint,
)
from opd_fast.config import ConfigError, RunConfig, first_line
from opd_fast.engine import lr_at, values_swapped_in
from opd_fast.evaluate.during import training_pools
from opd_fast.families import family_for_run
from opd_fast.hooks import Hook
from opd_fast.metrics import MetricsWriter
from opd_fast.models import Conditioning, autocast_dtype, student_forward_context
from opd_fast.profiling import PhaseTimer, nvtx_range, phase
from opd_fast.prompts import to_device
from opd_fast.run import RunParts, build_run
from opd_fast.run_folder import OutputDirError, RunFolder, config_hash
from opd_fast.teachers import Teacher, TeacherHandle, TeacherRunner
from opd_fast.trackers import check_trackers

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite rounds); the last good checkpoint is intact."""


@dataclass
class Lane:
    """One task's micro-batch in a round: its teacher, prompts, noise (trained steps + 1, B, ...) and loss scale."""

    index: int  # the task's index in cfg.tasks
    teacher: Teacher
    cond: Conditioning  # the student's text conditioning of the micro-batch's prompts
    noise: torch.Tensor
    scale: float
    # the teacher's: the same prompts through its own text encoders (RunParts.teacher_prompts); None: `cond`
    teacher_cond: Conditioning | None = None

    def __post_init__(self):
        if self.teacher_cond is None:
            self.teacher_cond = self.cond

    @property
    def steps(self) -> int:
        return self.noise.shape[0] - 1

    @property
    def batch(self) -> int:
        return self.noise.shape[1]


class _JointBatch:
    """The student's batch over the first k lanes (the ones still training): their states and prompts side by side
    (offsets[k] samples), and each lane's rows of the student's velocity."""

    def __init__(self, lanes: list[Lane]):
        self.lanes = lanes
        self.offsets = [0]
        for lane in lanes:
            self.offsets.append(self.offsets[-1] + lane.batch)
        self._conds: dict[int, Conditioning] = {}

    def states(self, x: list[torch.Tensor], k: int) -> torch.Tensor:
        return x[0] if k == 1 else torch.cat(x[:k])

    def cond(self, k: int) -> Conditioning:
        if k == 1:
            return self.lanes[0].cond
        if k not in self._conds:  # the negative prompt is one for all tasks (cfg.prompts.negative_prompt)
            conds = [lane.cond for lane in self.lanes[:k]]
            self._conds[k] = Conditioning(
                torch.cat([c.prompt_embeds for c in conds]),
                torch.cat([c.pooled for c in conds]),
                conds[0].negative_embeds,
                conds[0].negative_pooled,
            )
        return self._conds[k]

    def rows(self, v: torch.Tensor, guided: float | None, i: int, k: int) -> torch.Tensor:
        """Lane i's rows of the velocity of the first k lanes: (2n, ...) = [uncond; cond] when guided."""
        if k == 1:
            return v
        start, stop, n = self.offsets[i], self.offsets[i + 1], self.offsets[k]
        if guided is None:
            return v[start:stop]
        return torch.cat([v[start:stop], v[n + start : n + stop]])


@dataclass
class RoundResult:
    loss: float
    task_losses: dict[str, float]
    grad_norm: float | None  # None: the round was skipped (non-finite loss or gradient)
    # more of the round's numbers for its record (metrics.jsonl and the trackers): a subclass's own statistics, such
    # as stage 1's reward; a key may not shadow one of the record's own
    extra: dict[str, float] = field(default_factory=dict)


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Trainer:
    """Runs rounds with a run's parts (opd_fast.run): Trainer.build(cfg, out_dir) checks the folder, builds the
    parts and returns the trainer; Trainer(cfg, parts, out_dir) takes parts built (or swapped) by the caller.
    hooks (opd_fast.hooks.Hook) are called before each round, after its gradients and after its record; timer (a
    PhaseTimer) times the phases of every round. folder: the run folder, opened (locked and checked) by build;
    without it, the folder is locked here (not checked). close() releases it (so does the process's end)."""

    def __init__(
        self,
        cfg: RunConfig,
        parts: RunParts,
        out_dir: str | Path,
        *,
        resume: bool = False,
        hooks: Iterable[Hook] = (),
        timer: PhaseTimer | None = None,
        folder: RunFolder | None = None,
    ):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.parts = parts
        self.dist, self.family, self.loss_spec = parts.dist, parts.family, parts.loss
        self.folder = folder if folder is not None else RunFolder(self.out_dir, self.dist).open(cfg, resume, False)
        self.device = self.dist.device
        self.student, self.peft_config, self.teachers = parts.student, parts.peft_config, parts.teachers
        self.engine, self.ema, self.prompts, self.sigmas = parts.engine, parts.ema, parts.prompts, parts.sigmas
        self.teacher_prompts = parts.teacher_prompts  # task -> a teacher's own text conditioning (where it has one)
        self.backend = self.loss_spec.backend
        self.hooks = list(hooks)
        self.phase_timer = timer
        self.teacher_runner = TeacherRunner(
            self.family,
            self.device,
            cfg.teacher_runtime.stream,
            self._phase,
            cuda_graphs=cfg.teacher_runtime.cuda_graphs,
        )
        # bf16 autocast over a bf16 base with fp32 LoRA weights (read after the engine, which may cast the student)
        self.student_autocast = autocast_dtype(self.student)
        # the student's CFG as its family takes it (a two-expert model: a scale per expert)
        self.student_guidance = self.family.guidance(
            self.student, cfg.student.guidance, cfg.student.guidance_2, "student.guidance_2"
        )
        self._sigma_tables: dict[int, torch.Tensor] = {}  # batch -> (num_steps + 1, batch) sigmas on the device
        self._coef_tables: dict[tuple[int, int], torch.Tensor] = {}  # (batch, latent numel) -> coefficient table
        self.num_trained = {task.name: cfg.trained_steps(task) for task in cfg.tasks}  # leading steps trained
        self.metrics: MetricsWriter | None = None  # rank 0's writer while fit() runs (hooks log through it)
        self.round = 0
        self.nonfinite_rounds = 0
        self.streak = 0  # rounds skipped in a row just now: no checkpoint is written while it is > 0
        self.last_loss: float | None = None  # the latest round's loss (recorded in its checkpoint)
        try:
            # each task's prompt indices training draws from; None: the whole set (eval holds none out of it)
            self.train_pools = training_pools(cfg, {name: len(p.prompts) for name, p in self.prompts.items()})
            if resume:
                self._resume()
            self.folder.claim(cfg)
        except BaseException:
            self.folder.release()
            raise

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        device: str | None = None,
        hooks: Iterable[Hook] = (),
        timer: PhaseTimer | None = None,
        **parts,
    ) -> Trainer:
        """The trainer of the run `cfg` describes, into out_dir: the folder is checked (on every rank) before any
        model loads, then every part is built (opd_fast.run.build_run; `parts` passes its overrides, base= and
        teachers=). device: None = this rank's GPU when there is one, else the CPU."""
        family_for_run(cfg)  # an unknown family or preset, a bad video length, fail before anything is done
        check_trackers(cfg.logging)  # so does a tracker whose package is missing
        # The process group (DDP / DeepSpeed) and this rank's device: cuda:LOCAL_RANK, or the CPU.
        dist = distributed.setup(cfg.engine, device)
        # rank 0 locks the folder before anything else; every rank has looked at it before rank 0 writes into it
        folder = RunFolder(out_dir, dist).open(cfg, resume)
        try:
            built = build_run(cfg, out_dir, dist, **parts)
        except BaseException:
            folder.release()
            raise
        return cls(cfg, built, out_dir, resume=resume, hooks=hooks, timer=timer, folder=folder)

    def close(self) -> None:
        """Release the run folder's lock (the process's end does too): another process may then write it."""
        self.folder.release()

    # -- data ------------------------------------------------------------------------------------------------------
    def batch_indices(self, round_idx: int, task_idx: int) -> torch.Tensor:
        """This rank's prompt indices for (round, task). The global batch is drawn without replacement (when the
        set is large enough) and split into contiguous, non-overlapping slices per rank."""
        per_rank = self.cfg.train.micro_batch_size * self.cfg.train.micro_batches_per_task
        world, rank = self.dist.world_size, self.dist.rank
        name = self.cfg.tasks[task_idx].name
        pool = self.train_pools.get(name)
        n = len(self.prompts[name].prompts) if pool is None else len(pool)
        g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, round_idx, task_idx, 0))
        total = per_rank * world
        idx = torch.randperm(n, generator=g)[:total] if total <= n else torch.randint(n, (total,), generator=g)
        idx = idx[rank * per_rank : (rank + 1) * per_rank]
        return idx if pool is None else pool[idx]

    def sample_noise(self, round_idx: int, task_idx: int, first: int, shape: tuple[int, ...]) -> torch.Tensor:
        """(trained steps + 1, B, ...) noise: initial latent then one per trained step of the task; seeded per global
        sample, so a sample's trajectory does not depend on how the batch is split across ranks or micro-batches."""
        steps = self.num_trained[self.cfg.tasks[task_idx].name]
        per_sample = []
        for i in range(shape[0]):
            g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, round_idx, task_idx, 1, first + i))
            per_sample.append(torch.randn((steps + 1,) + shape[1:], generator=g))
        return to_device(torch.stack(per_sample, 1), self.device)

    # -- one round -------------------------------------------------------------------------------------------------
    def _phase(self, name: str):
        """An NVTX range around a phase of the round, timed when a benchmark attached a PhaseTimer."""
        return phase(name, self.phase_timer)

    def _sigma_rows(self, batch: int) -> torch.Tensor:
        """(num_steps + 1, batch) sigmas on the device, made once per batch size: a per-step host-to-device copy
        would make the host wait for the device (a pageable copy synchronises), and the teacher/backward overlap
        needs a host that runs ahead."""
        if batch not in self._sigma_tables:
            self._sigma_tables[batch] = self.sigmas.to(self.device)[:, None].expand(-1, batch).contiguous()
        return self._sigma_tables[batch]

    def _coefficients(self, batch: int, numel: int) -> torch.Tensor:
        """(num_steps, 4, batch): every step's per-sample scalars of the fused op, made once per batch size."""
        key = (batch, numel)
        if key not in self._coef_tables:
            self._coef_tables[key] = self.loss_spec.coefficient_table(self.sigmas, numel, batch, self.device)
        return self._coef_tables[key]

    def _student_velocity(self, x, sigma, cond, with_grad: bool):
        prefix = "" if with_grad else "rollout/"
        with (
            self._phase(prefix + "student_forward"),
            torch.set_grad_enabled(with_grad),
            student_forward_context(self.student, self.student_autocast),
        ):
            return self.family.velocity(self.engine.forward_model, x, sigma, cond, self.student_guidance)

    def _step(self, lane: Lane, j: int, x, v_student, student_cfg, teacher: TeacherHandle | None):
        """The fused step/loss of one lane at step j. teacher: the lane's submitted teacher forward at x (taken
        here, after the student's forward was launched, so a side-stream teacher runs alongside it); None in the
        two-pass rollout, whose step is the student's own."""
        with_grad = teacher is not None
        if with_grad:
            v_teacher, teacher_cfg = self.teacher_runner.result(teacher)  # any precision: opd_step promotes
        else:
            v_teacher, teacher_cfg = v_student, student_cfg
        sigmas = self._sigma_rows(lane.batch)
        coefs = self._coefficients(lane.batch, x[0].numel())
        with self._phase("loss" if with_grad else "rollout/loss"), torch.set_grad_enabled(with_grad):
            return self.loss_spec.step(
                x,
                v_student,
                v_teacher,
                lane.noise[j + 1],
                sigmas[j],
                sigmas[j + 1],
                coef=coefs[j],
                student_guidance=student_cfg,
                teacher_guidance=teacher_cfg,
            )

    def _train_lanes(self, lanes: list[Lane]) -> list[torch.Tensor]:
        """Roll out every lane (one task's micro-batch) from its noise[0] and backpropagate the loss of each of its
        trained steps (one per noise[1:]); returns each lane's per-sample loss summed (or averaged) over its steps,
        detached.

        One lane is the task-by-task schedule. Several lanes (train.task_batching) share the student's forward and
        backward: its weights are fixed within a round, so at step j one batch serves every task still training at
        step j (a task whose trained steps are over drops out of the batch); each teacher sees its own lane.

        Pipelining: a lane's teacher forward at x_{j+1} is submitted as soon as x_{j+1} exists (after opd_step(j),
        which needs teacher(x_j)) and BEFORE backward(j), so on a side CUDA stream it runs while backward(j) does;
        its result is awaited (a stream event, no host sync) only after the student's forward at x_{j+1}. On CPU the
        runner computes at submit: the same order, serially. No teacher call at untrained steps."""
        lanes = sorted(lanes, key=lambda lane: -lane.steps)  # stable; the lanes still training form a prefix
        runner = self.teacher_runner
        joint = _JointBatch(lanes)
        x = [lane.noise[0] for lane in lanes]
        totals = [torch.zeros(lane.batch, device=self.device) for lane in lanes]
        states = None  # two-pass: every lane's trained states, from the rollout without grad
        if self.cfg.train.schedule == "two_pass":
            states = [[state] for state in x]
            with self._phase("rollout"):
                for j in range(lanes[0].steps - 1):
                    k = sum(lane.steps > j + 1 for lane in lanes)  # lanes that train state j + 1
                    sigma = self._sigma_rows(joint.offsets[k])[j]
                    v, guided = self._student_velocity(joint.states(x, k), sigma, joint.cond(k), with_grad=False)
                    for i in range(k):
                        x[i], _ = self._step(lanes[i], j, x[i], joint.rows(v, guided, i, k), guided, None)
                        states[i].append(x[i])
            x = [lane_states[0] for lane_states in states]
        pending = [
            runner.submit(lane.teacher, x[i], self._sigma_rows(lane.batch)[0], lane.teacher_cond)
            for i, lane in enumerate(lanes)
        ]
        for j in range(lanes[0].steps):
            k = sum(lane.steps > j for lane in lanes)
            sigma = self._sigma_rows(joint.offsets[k])[j]
            v, guided = self._student_velocity(joint.states(x, k), sigma, joint.cond(k), with_grad=True)
            stepped = [self._step(lanes[i], j, x[i], joint.rows(v, guided, i, k), guided, pending[i]) for i in range(k)]
            for i in range(k):
                if j + 1 < lanes[i].steps:
                    x[i] = stepped[i][0] if states is None else states[i][j + 1]  # (two-pass: the same state)
                    pending[i] = runner.submit(
                        lanes[i].teacher, x[i], self._sigma_rows(lanes[i].batch)[j + 1], lanes[i].teacher_cond
                    )  # overlaps backward(j)
            loss = stepped[0][1].sum() * lanes[0].scale
            for i in range(1, k):
                loss = loss + stepped[i][1].sum() * lanes[i].scale
            with self._phase("backward"):
                self.engine.backward(loss)
            for i in range(k):
                totals[i] += stepped[i][1].detach()
        if self.cfg.loss.timestep_reduction == "mean":
            for lane, total in zip(lanes, totals):
                total /= lane.steps
        return [total for _, total in sorted(zip(lanes, totals), key=lambda pair: pair[0].index)]

    def _lane(self, t_idx: int, start: int, indices: torch.Tensor, shape: tuple[int, ...], scale: float) -> Lane:
        """Task t_idx's micro-batch of this round starting at sample `start` of this rank's share."""
        cfg, mb = self.cfg, self.cfg.train.micro_batch_size
        task = cfg.tasks[t_idx]
        per_rank = mb * cfg.train.micro_batches_per_task
        task_scale = scale * task.loss_weight
        if cfg.loss.timestep_reduction == "mean":
            task_scale /= self.num_trained[task.name]
        noise = self.sample_noise(self.round, t_idx, self.dist.rank * per_rank + start, shape)
        rows = indices[start : start + mb]
        cond = self.prompts[task.name].conditioning(rows, self.device)
        own = self.teacher_prompts.get(task.name)  # a teacher with text encoders of its own: the same rows, its set
        teacher_cond = None if own is None else own.conditioning(rows, self.device)
        return Lane(t_idx, self.teachers[task.name], cond, noise, task_scale, teacher_cond)

    def train_round(self, step: bool = True) -> RoundResult:
        """One round: every task's micro-batches, then ONE optimizer step and the EMA. step=False measures the round
        instead: its gradient reaches the after_gradients hooks and is then dropped, the student unchanged (the round
        counter still advances, so the next round draws other prompts and noise)."""
        for hook in self.hooks:
            hook.before_round(self, self.round)
        cfg = self.cfg
        mb = cfg.train.micro_batch_size
        per_rank = mb * cfg.train.micro_batches_per_task
        scale = 1.0 / (len(cfg.tasks) * per_rank)
        shape = self.family.latent_shape(self.student, mb, cfg.sampling.resolution)
        indices = [self.batch_indices(self.round, t_idx) for t_idx in range(len(cfg.tasks))]
        losses: list[list[torch.Tensor]] = [[] for _ in cfg.tasks]
        if cfg.train.task_batching:
            with nvtx_range("tasks"):
                for start in range(0, per_rank, mb):
                    lanes = [self._lane(t_idx, start, indices[t_idx], shape, scale) for t_idx in range(len(cfg.tasks))]
                    for t_idx, total in enumerate(self._train_lanes(lanes)):
                        losses[t_idx].append(total)
        else:
            for t_idx, task in enumerate(cfg.tasks):
                with nvtx_range(f"task:{task.name}"):
                    for start in range(0, per_rank, mb):
                        losses[t_idx] += self._train_lanes([self._lane(t_idx, start, indices[t_idx], shape, scale)])
        task_losses = {task.name: torch.cat(per_task).mean() for task, per_task in zip(cfg.tasks, losses)}
        # One host sync per round: a NaN/inf anywhere shows up in the loss sum or the gradient norm. Averaged over
        # ranks first, so every rank takes the same step-or-skip decision (and logs the global batch's loss).
        averaged = self.engine.average(torch.stack(list(task_losses.values())))
        values = {name: float(v) for name, v in zip(task_losses, averaged)}
        loss = sum(values.values()) / len(values)
        return RoundResult(loss, values, self._finish_round(loss, step))

    def _finish_round(self, loss: float, step: bool) -> float | None:
        """The end of every round, whatever its loss (OPD's, stage 1's): the after_gradients hooks, then ONE optimizer
        step (or, with step=False or a non-finite loss, the gradient dropped), the EMA, the round counter. `loss` is
        the round's loss averaged over ranks, so every rank takes the same step-or-skip decision. Returns the
        gradient norm; None: the round was skipped."""
        for hook in self.hooks:
            hook.after_gradients(self, self.round)
        grad_norm = None
        with self._phase("optimizer"):
            if step and math.isfinite(loss):
                self.engine.lr = lr_at(self.cfg.optimizer, self.round, self.cfg.train.rounds)
                grad_norm = self.engine.step()
            else:
                self.engine.zero_grad()
        if grad_norm is not None and self.ema is not None:
            self.ema.update(self.round + 1)  # s = optimizer steps so far, this one included (Flow-GRPO's global_step)
        self.round += 1
        self.streak = self.streak + 1 if grad_norm is None else 0
        self.last_loss = loss
        return grad_norm

    # -- the run ---------------------------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> list[dict]:
        """Train up to cfg.train.rounds, or stop after round `until` with a checkpoint (a later --resume goes on; the
        lr schedule spans train.rounds either way). The hooks' after_record runs after each round's record is
        written; its time is not in the record's seconds."""
        cfg = self.cfg
        stop = cfg.train.rounds if until is None else min(until, cfg.train.rounds)
        main = self.dist.is_main
        # Rank 0 alone touches the log: ranks truncating it at once on resume would race.
        metrics = MetricsWriter.for_run(cfg, self.out_dir, self.round) if main else None
        self.metrics = metrics
        records = []
        bar = None
        if cfg.logging.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.rounds, initial=self.round, desc="opd rounds", unit="round")
        try:
            while self.round < stop:
                t0 = time.perf_counter()
                result = self.train_round()
                record = {
                    "step": self.round,
                    "loss": result.loss,
                    **{f"loss/{k}": v for k, v in result.task_losses.items()},
                    "grad_norm": result.grad_norm,
                    "lr": self.engine.lr,
                    "skipped": result.grad_norm is None,
                    "nonfinite_rounds": self.nonfinite_rounds + (result.grad_norm is None),
                    "seconds": time.perf_counter() - t0,
                    "backend": self.backend,
                }
                shadowed = sorted(record.keys() & result.extra.keys())
                if shadowed:
                    raise ValueError(f"RoundResult.extra: {shadowed} are the record's own keys")
                record.update(result.extra)
                if result.grad_norm is None:
                    self.nonfinite_rounds += 1
                    log.warning(
                        "round %d: non-finite loss or gradient (loss %s), optimizer step skipped (%d so far)",
                        self.round,
                        result.loss,
                        self.nonfinite_rounds,
                    )
                if main:
                    metrics.write(record)
                records.append(record)
                for hook in self.hooks:
                    hook.after_record(self, record)
                faults.point("round.done")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.loss:.4g}")
                if self.nonfinite_rounds > cfg.train.max_nonfinite_rounds:
                    raise TrainingError(
                        f"{self.nonfinite_rounds} rounds had a non-finite loss or gradient (more than "
                        f"train.max_nonfinite_rounds={cfg.train.max_nonfinite_rounds}); stopping. "
                        + self._set_aside_suspect()
                        + self._last_good()
                    )
                if self.round % cfg.checkpoint.every == 0 or self.round == stop:
                    self.save()
        finally:
            for hook in self.hooks:
                hook.close()
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
            self.metrics = None
        self.export()
        return records

    def _save_with(self, values: dict[str, torch.Tensor], folder: Path) -> None:
        """save_pretrained of the student with `values` (name -> full tensor) in place of those parameters; the
        parameters are put back after (the caller holds them gathered under ZeRO-3)."""
        params = dict(self.student.named_parameters())
        with values_swapped_in([params[n] for n in values], list(values.values())):
            self.student.save_pretrained(folder)

    # -- checkpoints -----------------------------------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        """What every checkpoint of this run carries and a resume checks: the run and its recipe."""
        return {"run_id": self.folder.run_id, "config_hash": config_hash(self.cfg)}

    def _required_state(self) -> tuple[str, ...]:
        return ("student", "optimizer") + (("ema",) if self.ema is not None else ())

    def save(self) -> Path | None:
        """A checkpoint of the current state, unless it is not a good one: none while the run is in a streak of
        non-finite rounds (the previous checkpoint holds the same weights and stays the last good one), none of
        non-finite weights."""
        if self.streak:
            log.warning(
                "round %d: no checkpoint during a streak of non-finite rounds (%d so far); the checkpoints stay as "
                "they are",
                self.round,
                self.streak,
            )
            return None
        # Full tensors gathered to rank 0 (a collective under ZeRO: every rank takes part), one layout for all engines.
        opt_tensors, opt_rest = flatten_optimizer_state(self.engine.state_dict())
        tensors = {"student": self.engine.trainable_state(), "optimizer": opt_tensors}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        if not self.dist.is_main:
            return None
        weights = [t for t in tensors["student"].values() if t.is_floating_point() and t.numel()]
        max_abs = max((float(t.detach().abs().max()) for t in weights), default=0.0)
        if not math.isfinite(max_abs):
            log.warning("round %d: the student's weights are not finite: no checkpoint", self.round)
            return None
        meta = {
            "round": self.round,
            "nonfinite_rounds": self.nonfinite_rounds,
            "loss": self.last_loss,
            "max_abs_weight": max_abs,
            "optimizer": opt_rest,
        }
        return save_checkpoint(
            self.out_dir, self.round, tensors, meta, self.cfg.checkpoint.keep_last, identity=self.identity
        )

    def _last_good(self) -> str:
        """The checkpoint the run can go on from, in words. Only good states are checkpointed (finite weights,
        written after a round with a finite loss); during a streak of non-finite rounds, the checkpoint of the last
        finite round is not one: the non-finite rounds were computed at its weights. Every older one is: a later
        round's finite loss was computed at its weights."""
        suspect = self.round - self.streak if self.streak else None
        try:
            good = [
                p
                for p in list_checkpoints(self.out_dir)
                if suspect is None or checkpoint_step(p) < suspect
                if self._verifies(p)
            ]
        except OSError:
            good = []
        if not good:
            return "No checkpoint holds a state known to be good: start the run over (e.g. with a lower optimizer.lr)"
        meta = json.loads((good[-1] / "state.json").read_text())
        return (
            f"The last good checkpoint is {good[-1]} (round {meta['round']}, loss {meta.get('loss'):.4g}, largest "
            f"|weight| {meta.get('max_abs_weight', float('nan')):.3g}); --resume goes on from it"
        )

    def _verifies(self, path: Path) -> bool:
        try:
            verify_checkpoint(path, self.identity, self._required_state(), checksums=False)
        except CheckpointError:
            return False
        return True

    def _set_aside_suspect(self) -> str:
        """The run stops in a streak of non-finite rounds: the checkpoint of the last finite round holds the weights
        those rounds were computed at, so it is moved out of the way of --resume (kept, for a look at what went
        wrong) and never named as the last good one. Rank 0; returns the sentence that says so."""
        step = self.round - self.streak
        path = checkpoint_path(self.out_dir, step)
        if not (self.streak and self.dist.is_main and path.is_dir()):
            return ""
        aside = path.with_name(f"nonfinite_{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(path, aside)
        return f"The non-finite rounds were computed at the weights of round {step}: its checkpoint is set aside as {aside}. "

    def _resume(self) -> None:
        """Continue from the newest checkpoint that proves it holds this run's state (opd_fast.checkpoint); the
        newer ones that do not are skipped with a warning naming each and why."""
        error, path = None, None
        try:
            path = newest_verified(self.out_dir, self.identity, self._required_state())
        except CheckpointError as e:
            error = e
        # before the load, whose gathers and scatters (ZeRO-3) would pair up wrongly across ranks that disagree
        self._check_ranks_agree(-1 if error is not None else 0 if path is None else checkpoint_step(path))
        if error is not None:
            raise error
        if path is None:
            log.info("--resume: no checkpoint in %s, starting from round 0", self.out_dir)
            return
        tensors, meta = load_checkpoint(path)
        params = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        if set(params) != set(tensors["student"]):
            raise ConfigError(
                f"{path}: its student parameters do not match this config's student (other LoRA targets or rank?)"
            )
        try:
            self.engine.load_trainable_state(tensors["student"])
            self.engine.load_state_dict(unflatten_optimizer_state(tensors["optimizer"], meta["optimizer"]))
            if self.ema is not None:
                self.ema.load_state_dict(tensors["ema"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: its state does not fit this run's student ({first_line(e)})") from None
        self.round = meta["round"]
        self.nonfinite_rounds = meta["nonfinite_rounds"]
        self.last_loss = meta.get("loss")
        log.info("resumed from %s at round %d", path, self.round)

    def _check_ranks_agree(self, round_idx: int) -> None:
        """Every rank must resume the same checkpoint (OUT on a filesystem that not all nodes share would break
        this; a rank that finds none takes part with round 0, one whose checkpoints all failed with -1)."""
        if self.cfg.engine.kind == "single":  # one process, no group
            return
        # (a world of one checks too: on one GPU, that is the NCCL group's own test of this collective)
        high, neg_low = distributed.all_reduce(torch.tensor([round_idx, -round_idx]), self.dist, "max").tolist()
        if high != -neg_low:
            raise OutputDirError(
                f"ranks resumed different rounds ({-neg_low}..{high}): is {self.out_dir} on a filesystem that every "
                "node shares? (-1: a rank none of whose checkpoints verified; each rank's log names the checkpoints "
                "it skipped and why)"
            )

    def export(self) -> Path | None:
        """OUT/lora_diffusers (and OUT/lora_diffusers_ema with EMA) in the diffusers layout; full-parameter
        students are saved as diffusers transformer folders OUT/transformer (and OUT/transformer_ema)."""
        from peft.utils import get_peft_model_state_dict

        main = self.dist.is_main
        if self.peft_config is None:
            ema = self.ema.state_dict() if self.ema is not None else None  # full tensors on rank 0 (a collective)
            with self.engine.gathered():  # ZeRO-3: every rank takes part in gathering the whole model
                if main:
                    self.student.save_pretrained(self.out_dir / "transformer")
                    if ema is not None:
                        self._save_with(dict(zip(self.engine.names, ema.values())), self.out_dir / "transformer_ema")
            return self.out_dir / "transformer" if main else None
        # The weights as full tensors on rank 0 (ZeRO-3 keeps only shards in the module): every rank takes part.
        weights = self.engine.trainable_state()
        ema = self.ema.state_dict() if self.ema is not None else None
        if not main:
            return None
        path = export_diffusers_lora(
            self.student,
            self.peft_config,
            self.family,
            self.out_dir / "lora_diffusers",
            lora_state=get_peft_model_state_dict(self.student, state_dict=weights),
        )
        if ema is not None:  # EMA keeps the trainable tensors in the engine's order, which is trainable_state's
            ema_weights = dict(zip(weights, ema.values()))
            export_diffusers_lora(
                self.student,
                self.peft_config,
                self.family,
                self.out_dir / "lora_diffusers_ema",
                lora_state=get_peft_model_state_dict(self.student, state_dict=ema_weights),
            )
        return path
