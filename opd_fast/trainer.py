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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_fast import attention, distributed
from opd_fast.checkpoint import (
    checkpoint_step,
    export_diffusers_lora,
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from opd_fast.config import ConfigError, RunConfig
from opd_fast.datasets import read_dataset
from opd_fast.engine import EMA, Engine, lr_at, make_engine, values_swapped_in
from opd_fast.families import Family, get_family
from opd_fast.metrics import MetricsWriter
from opd_fast.models import (
    DTYPES,
    Conditioning,
    add_student_lora,
    autocast_dtype,
    load_transformer,
    student_forward_context,
)
from opd_fast.ops import LossSpec
from opd_fast.profiling import CaptureWindow, PhaseTimer, nvtx_range, phase
from opd_fast.prompts import BuiltinTextEncoder, EncodedPrompts, encode_cached, to_device
from opd_fast.schedule import sigma_grid
from opd_fast.teachers import Teacher, TeacherHandle, TeacherRunner, load_teachers

log = logging.getLogger(__name__)
RESUMABLE_CHANGES = {
    "train.rounds",
    "checkpoint.every",
    "checkpoint.keep_last",
    "logging.progress",
    "logging.tensorboard",
    "loss.backend",
    "engine.kind",
    "engine.zero_stage",
    "engine.offload",
    "engine.bf16",
    "engine.timeout_s",
    "engine.persistence_threshold",
    "teacher_runtime.stream",
    "teacher_runtime.mode",
    "teacher_runtime.cuda_graphs",
    "prompts.placement",
}  # (speed only: same teacher outputs)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite rounds); the last good checkpoint is intact."""


class OutputDirError(RuntimeError):
    """The output folder holds another run or other files."""


@dataclass
class Lane:
    """One task's micro-batch in a round: its teacher, prompts, noise (trained steps + 1, B, ...) and loss scale."""

    index: int  # the task's index in cfg.tasks
    teacher: Teacher
    cond: Conditioning
    noise: torch.Tensor
    scale: float

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


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def flat_config(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        else:
            out[name] = value
    return out


def encode_task_prompts(
    cfg: RunConfig, family: Family, student: torch.nn.Module, cache_dir: Path
) -> dict[str, EncodedPrompts]:
    """Each task's prompt set, encoded once into the embedding cache. All files are read (and checked) before
    anything is written."""
    prompt_sets = {task.name: read_dataset(task.prompts, task.prompts_kind, task.name) for task in cfg.tasks}
    if cfg.prompts.encoder == "builtin":
        enc = BuiltinTextEncoder(
            student.config.joint_attention_dim, student.config.pooled_projection_dim, cfg.prompts.max_tokens
        )
        encode_fn, name = enc.encode, f"{enc.name}-{enc.dim}-{enc.pooled_dim}-{enc.max_tokens}"
    else:
        from opd_fast.text_encoders import pipeline_encoder

        encode_fn, name = pipeline_encoder(cfg.model, family, cfg.prompts)
    return {
        task: encode_cached(prompt_set, encode_fn, name, cfg.prompts.negative_prompt, cache_dir / f"{task}.safetensors")
        for task, prompt_set in prompt_sets.items()
    }


PROMPTS_DEVICE_SHARE = 0.1  # prompts.placement auto: the cache goes to the GPU when it takes at most this share


def place_prompts(
    prompts: dict[str, EncodedPrompts], cfg: RunConfig, device: torch.device
) -> dict[str, EncodedPrompts]:
    """The embedding caches where cfg.prompts.placement puts them: on the device, in the widest dtype any model
    reads them in (fp32 when the model or a teacher runs in fp32, else the model's 16-bit dtype: the transformers
    cast their text inputs to it, so nothing is lost), or left on the host (each micro-batch's rows are then copied
    through pinned memory)."""
    if device.type != "cuda":
        return prompts
    wide = cfg.model.dtype == "float32" or cfg.teacher_runtime.precision == "fp32"
    dtype = torch.float32 if wide else DTYPES[cfg.model.dtype]
    placement = cfg.prompts.placement
    if placement == "auto":
        need = sum(p.nbytes() for p in prompts.values()) * torch.finfo(dtype).bits // 32  # cached as float32
        placement = (
            "device" if need <= PROMPTS_DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory else "host"
        )
        log.info("prompt embeddings: %.2f GB in %s on the %s (prompts.placement auto)", need / 1e9, dtype, placement)
    if placement == "device":
        return {task: p.to(device, dtype) for task, p in prompts.items()}
    return prompts


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        device: str | None = None,
        engine: Engine | None = None,
    ):
        self.cfg = cfg
        self.family = get_family(cfg.model.family)  # first: an unknown family fails before anything is done
        self.out_dir = Path(out_dir)
        # The process group (DDP / DeepSpeed) and this rank's device: cuda:LOCAL_RANK, or the CPU.
        self.dist = distributed.setup(cfg.engine, device)
        self.device = self.dist.device
        self._check_output_dir(resume)
        self.dist.barrier()  # every rank has looked at the folder before rank 0 writes into it

        # before the models load (minutes at full size) and before anything is written
        attention.check(cfg.model.attention)
        try:
            self.loss_spec = LossSpec.from_config(cfg.loss, cfg.sampling, self.device)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"loss.backend: {e}") from None
        self.backend = self.loss_spec.backend
        log.info("opd_step backend: %s", self.backend)
        base = load_transformer(cfg.model, self.family).to(self.device)
        # Teachers are frozen copies of the base (LoRA merged, or adapters on one shared copy; cfg.teacher_runtime),
        # made before the student gets its adapter.
        self.teachers: dict[str, Teacher] = load_teachers(cfg.tasks, base, self.family, cfg.teacher_runtime)
        self.phase_timer: PhaseTimer | None = None  # benchmarks attach one to time the phases
        self.capture: CaptureWindow | None = None  # opd-fast train --profile-steps a:b
        self.teacher_runner = TeacherRunner(
            self.family,
            self.device,
            cfg.teacher_runtime.stream,
            self._phase,
            cuda_graphs=cfg.teacher_runtime.cuda_graphs,
        )
        self._sigma_tables: dict[int, torch.Tensor] = {}  # batch -> (num_steps + 1, batch) sigmas on the device
        self._coef_tables: dict[tuple[int, int], torch.Tensor] = {}  # (batch, latent numel) -> coefficient table
        self.student = base
        for model in {id(m): m for m in [base] + [t.model for t in self.teachers.values()]}.values():
            attention.use_backend(model, cfg.model.attention)
        with torch.random.fork_rng(devices=[]):  # peft draws the adapter init from the global RNG
            torch.manual_seed(cfg.train.seed)
            self.peft_config = add_student_lora(self.student, cfg.student.lora)
        if cfg.model.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.student.train()
        # After the teachers were copied: DeepSpeed ZeRO-3 partitions the student it is given, and only the student.
        self.engine: Engine = engine if engine is not None else make_engine(cfg, self.student, self.dist)
        self.ema = EMA(self.engine.params, cfg.ema, self.engine) if cfg.ema.enabled else None
        # bf16 autocast over a bf16 base with fp32 LoRA weights (read after the engine, which may cast the student)
        self.student_autocast = autocast_dtype(self.student)

        cache_dir = Path(cfg.prompts.cache_dir) if cfg.prompts.cache_dir else self.out_dir / "embeddings"
        with distributed.rank_zero_first(self.dist):  # rank 0 fills the cache, the others read it
            self.prompts = place_prompts(
                encode_task_prompts(cfg, self.family, self.student, cache_dir), cfg, self.device
            )

        self.sigmas = sigma_grid(
            self.family,
            cfg.sampling.num_steps,
            cfg.sampling.shift,
            path=cfg.model.path,
            image_seq_len=self.family.image_tokens(self.student, cfg.sampling.resolution),
        )
        self.num_trained = {task.name: cfg.trained_steps(task) for task in cfg.tasks}  # leading steps trained
        self.round = 0
        self.nonfinite_rounds = 0
        if resume:
            self._resume()
        self._write_run_file()

    # -- output folder ---------------------------------------------------------------------------------------------
    def _check_output_dir(self, resume: bool) -> None:
        run_file = self.out_dir / "run.json"
        mine = flat_config(self.cfg.to_dict())
        if run_file.is_file():
            if not resume:
                raise OutputDirError(
                    f"{self.out_dir} already holds a run ({run_file}); pass --resume to continue it "
                    "or choose another --out"
                )
            theirs = flat_config(json.loads(run_file.read_text())["config"])
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            # the cosine schedule anneals over train.rounds: another length would change every rate still to come
            cosine = mine.get("optimizer.schedule") == "cosine"
            fatal = [k for k in changed if k not in RESUMABLE_CHANGES or (k == "train.rounds" and cosine)]
            if fatal:
                raise OutputDirError(
                    f"{self.out_dir} holds a run with another config; differing keys: "
                    + ", ".join(f"{k} ({theirs.get(k)!r} -> {mine.get(k)!r})" for k in fatal)
                    + (
                        "; with optimizer.schedule cosine, train.rounds cannot change"
                        if "train.rounds" in fatal
                        else ""
                    )
                )
        elif self.out_dir.is_dir() and any(p.name != "embeddings" for p in self.out_dir.iterdir()):
            # (OUT/embeddings alone is the prompt cache of a start of ours that failed before writing run.json)
            raise OutputDirError(
                f"{self.out_dir} is not empty and holds no run.json: refusing to write a run into "
                "it; choose an empty or new --out"
            )

    def _write_run_file(self) -> None:
        """Mark the folder as this run's, once everything loaded: a run that failed to start leaves no claim."""
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_file = self.out_dir / "run.json"
        tmp = run_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"config": self.cfg.to_dict()}, indent=2))
        tmp.replace(run_file)

    # -- data ------------------------------------------------------------------------------------------------------
    def batch_indices(self, round_idx: int, task_idx: int) -> torch.Tensor:
        """This rank's prompt indices for (round, task). The global batch is drawn without replacement (when the
        set is large enough) and split into contiguous, non-overlapping slices per rank."""
        per_rank = self.cfg.train.micro_batch_size * self.cfg.train.micro_batches_per_task
        world, rank = self.engine.world_size, self.engine.rank
        n = len(self.prompts[self.cfg.tasks[task_idx].name].prompts)
        g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, round_idx, task_idx, 0))
        total = per_rank * world
        idx = torch.randperm(n, generator=g)[:total] if total <= n else torch.randint(n, (total,), generator=g)
        return idx[rank * per_rank : (rank + 1) * per_rank]

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
            return self.family.velocity(self.engine.forward_model, x, sigma, cond, self.cfg.student.guidance)

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
            runner.submit(lane.teacher, x[i], self._sigma_rows(lane.batch)[0], lane.cond)
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
                        lanes[i].teacher, x[i], self._sigma_rows(lanes[i].batch)[j + 1], lanes[i].cond
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
        noise = self.sample_noise(self.round, t_idx, self.engine.rank * per_rank + start, shape)
        cond = self.prompts[task.name].conditioning(indices[start : start + mb], self.device)
        return Lane(t_idx, self.teachers[task.name], cond, noise, task_scale)

    def train_round(self) -> RoundResult:
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
        grad_norm = None
        with self._phase("optimizer"):
            if math.isfinite(loss):
                self.engine.lr = lr_at(cfg.optimizer, self.round, cfg.train.rounds)
                grad_norm = self.engine.step()
            else:
                self.engine.zero_grad()
        if grad_norm is not None and self.ema is not None:
            self.ema.update(self.round + 1)  # s = optimizer steps so far, this one included (Flow-GRPO's global_step)
        self.round += 1
        return RoundResult(loss, values, grad_norm)

    # -- the run ---------------------------------------------------------------------------------------------------
    def fit(self, on_round=None, until: int | None = None) -> list[dict]:
        """Train up to cfg.train.rounds, or stop after round `until` with a checkpoint (a later --resume goes on; the
        lr schedule spans train.rounds either way). on_round(trainer, record), if given, runs after each round's
        record is written (e.g. an evaluation, as the demo's reward curves); its time is not in the record's seconds."""
        cfg = self.cfg
        stop = cfg.train.rounds if until is None else min(until, cfg.train.rounds)
        # Rank 0 alone touches the log: ranks truncating it at once on resume would race.
        metrics = MetricsWriter(self.out_dir, cfg.logging.tensorboard, self.round) if self.engine.rank == 0 else None
        records = []
        bar = None
        if cfg.logging.progress and self.engine.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.rounds, initial=self.round, desc="opd rounds", unit="round")
        try:
            while self.round < stop:
                t0 = time.perf_counter()
                if self.capture is not None:
                    self.capture.before_round(self.round)
                result = self.train_round()
                if self.capture is not None:
                    self.capture.after_round(self.round - 1)
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
                if result.grad_norm is None:
                    self.nonfinite_rounds += 1
                    log.warning(
                        "round %d: non-finite loss or gradient (loss %s), optimizer step skipped (%d so far)",
                        self.round,
                        result.loss,
                        self.nonfinite_rounds,
                    )
                if self.engine.rank == 0:
                    metrics.write(record)
                records.append(record)
                if on_round is not None:
                    on_round(self, record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.loss:.4g}")
                if self.nonfinite_rounds > cfg.train.max_nonfinite_rounds:
                    raise TrainingError(
                        f"{self.nonfinite_rounds} rounds had a non-finite loss or gradient (more than "
                        f"train.max_nonfinite_rounds={cfg.train.max_nonfinite_rounds}); stopping. The last good "
                        f"checkpoint is {latest_checkpoint(self.out_dir)}"
                    )
                if self.round % cfg.checkpoint.every == 0 or self.round == stop:
                    self.save()
        finally:
            if self.capture is not None:
                self.capture.close()
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
        self.export()
        return records

    def _save_with(self, values: dict[str, torch.Tensor], folder: Path) -> None:
        """save_pretrained of the student with `values` (name -> full tensor) in place of those parameters; the
        parameters are put back after (the caller holds them gathered under ZeRO-3)."""
        params = dict(self.student.named_parameters())
        with values_swapped_in([params[n] for n in values], list(values.values())):
            self.student.save_pretrained(folder)

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        # Full tensors gathered to rank 0 (a collective under ZeRO: every rank takes part), one layout for all engines.
        opt_tensors, opt_rest = flatten_optimizer_state(self.engine.state_dict())
        tensors = {"student": self.engine.trainable_state(), "optimizer": opt_tensors}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        meta = {"round": self.round, "nonfinite_rounds": self.nonfinite_rounds, "optimizer": opt_rest}
        if self.engine.rank != 0:
            return None
        return save_checkpoint(self.out_dir, self.round, tensors, meta, self.cfg.checkpoint.keep_last)

    def _resume(self) -> None:
        path = latest_checkpoint(self.out_dir)
        # before the load, whose gathers and scatters (ZeRO-3) would pair up wrongly across ranks that disagree
        self._check_ranks_agree(0 if path is None else checkpoint_step(path))
        if path is None:
            log.info("--resume: no checkpoint in %s, starting from round 0", self.out_dir)
            return
        tensors, meta = load_checkpoint(path)
        params = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        if set(params) != set(tensors["student"]):
            raise ConfigError(
                f"{path}: its student parameters do not match this config's student (other LoRA targets or rank?)"
            )
        self.engine.load_trainable_state(tensors["student"])
        self.engine.load_state_dict(unflatten_optimizer_state(tensors["optimizer"], meta["optimizer"]))
        if self.ema is not None and "ema" in tensors:
            self.ema.load_state_dict(tensors["ema"])
        self.round = meta["round"]
        self.nonfinite_rounds = meta["nonfinite_rounds"]
        log.info("resumed from %s at round %d", path, self.round)

    def _check_ranks_agree(self, round_idx: int) -> None:
        """Every rank must resume the same checkpoint (OUT on a filesystem that not all nodes share would break
        this; a rank that finds none takes part with round 0)."""
        if self.cfg.engine.kind == "single":  # one process, no group
            return
        # (a world of one checks too: on one GPU, that is the NCCL group's own test of this collective)
        high, neg_low = distributed.all_reduce(torch.tensor([round_idx, -round_idx]), self.dist, "max").tolist()
        if high != -neg_low:
            raise OutputDirError(
                f"ranks resumed different rounds ({-neg_low}..{high}): is "
                f"{self.out_dir} on a filesystem that every node shares?"
            )

    def export(self) -> Path | None:
        """OUT/lora_diffusers (and OUT/lora_diffusers_ema with EMA) in the diffusers layout; full-parameter
        students are saved as diffusers transformer folders OUT/transformer (and OUT/transformer_ema)."""
        from peft.utils import get_peft_model_state_dict

        main = self.engine.rank == 0
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
