"""In-training evaluation (the `eval:` config section): EvalHook, which `opd-fast train` adds when the config asks for
it, and which a Python caller passes itself: Trainer.build(cfg, out, hooks=[EvalHook()]).

After round r's record (every eval.every rounds, and after the run's last round with eval.at_end), each model of
eval.models (the EMA weights swapped into the student, or the student as it is) samples every task's evaluation
prompts x eval.seeds through the family's diffusers pipeline: its transformer is the student itself, its VAE and
scheduler come from eval.pipeline (or model.path), and the prompts are encoded as training encodes them
(prompts.encoder), so the student sees at evaluation what it sees in training. The grids (a row per prompt, a column
per seed) go to the trackers at step r at once; the rewards score the images in a background thread while training
goes on, and their scores reach OUT/eval.jsonl (opd_fast.evaluate.records, what `opd-fast report` reads),
metrics.jsonl and the trackers when they arrive.

- Held-out prompts: a task without its own eval.prompts file is evaluated on eval.prompts_per_task of its training
  prompts, drawn with eval.seed, and training never draws those (Trainer.batch_indices draws from training_pools).
  A config without an evaluation holds nothing out: its training numbers are those of before evaluation existed.
- Rewards: eval.rewards.TASK and eval.rewards."*" score TASK's images (the paper's in-domain and cross-task columns);
  a reward named as its task (ocr on ocr) is in-domain. A reward that cannot be built or fails to score (a server
  down, a model missing) is a warning with the reason; it is built or tried again at the next evaluation.
- Time: the generation runs in after_record, whose time is not in the round's "seconds"; the evaluation record has
  its own (generation + scoring). The run's end waits at most eval.wait_s for evaluations still being scored.
- Steps: scores arrive after later rounds were logged. TensorBoard takes them at step r; W&B drops a step older than
  its current one, so there they are logged into the current row with eval/step = r, the x axis of the eval/* charts
  (define_metric).
- Ranks: every rank samples a contiguous share of each task's images (noise is seeded per image, so the images do
  not depend on the split); rank 0 gathers them (opd_fast.distributed) and alone scores and writes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_fast.config import ConfigError, RunConfig
from opd_fast.hooks import Hook

log = logging.getLogger(__name__)


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# -- which prompts -----------------------------------------------------------------------------------------------


def held_out(cfg: RunConfig, task_idx: int, n: int) -> torch.Tensor:
    """The indices (sorted) of task task_idx's evaluation prompts among the n of its set: eval.prompts_per_task of
    them (all when the set is smaller), drawn without replacement with eval.seed."""
    g = torch.Generator().manual_seed(_seed(cfg.eval.seed, task_idx, 2))
    return torch.randperm(n, generator=g)[: cfg.eval.prompts_per_task].sort().values


def training_pools(cfg: RunConfig, sizes: dict[str, int]) -> dict[str, torch.Tensor | None]:
    """Each task's prompt indices that training draws from (sizes: task -> prompts in its set): all but the held-out
    ones when the task is evaluated on its own set, None (the whole set) otherwise."""
    pools: dict[str, torch.Tensor | None] = {}
    for i, task in enumerate(cfg.tasks):
        if not cfg.eval.enabled or task.name in cfg.eval.prompts:
            pools[task.name] = None
            continue
        n = sizes[task.name]
        if n <= cfg.eval.prompts_per_task:
            raise ConfigError(
                f"eval.prompts_per_task: holding {cfg.eval.prompts_per_task} of task {task.name!r}'s {n} prompts out "
                f"of training leaves none to train on; lower it or give eval.prompts.{task.name} (a separate file)"
            )
        keep = torch.ones(n, dtype=torch.bool)
        keep[held_out(cfg, i, n)] = False
        pools[task.name] = keep.nonzero().flatten()
    return pools


def rank_share(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of n items: near-equal slices, the first n % world ranks one item more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_images(local: list, n: int, size: tuple[int, int], dist) -> list | None:
    """Every rank's share (rank_share order) of n (H, W, 3) uint8 images, on rank 0 in item order; None elsewhere.
    One collective: each rank's share padded to the largest."""
    if dist.world_size == 1:
        return local
    import numpy as np

    from opd_fast import distributed

    per = -(-n // dist.world_size)
    buffer = torch.zeros((per, *size, 3), dtype=torch.uint8)
    for i, image in enumerate(local):
        buffer[i] = torch.from_numpy(np.ascontiguousarray(image))
    everything = distributed.all_gather_flat(buffer, dist).cpu().view(dist.world_size, per, *size, 3)
    if not dist.is_main:
        return None
    counts = [len(rank_share(n, r, dist.world_size)) for r in range(dist.world_size)]
    return [everything[r, i].numpy() for r in range(dist.world_size) for i in range(counts[r])]


@dataclass
class EvalSet:
    """A task's evaluation prompts with their conditioning as training encodes it (CPU float32)."""

    task: str
    indices: list[int]  # each prompt's index in its file: its images' noise seed, whatever else is evaluated
    prompts: list[str]
    metadata: list[dict]
    embeds: torch.Tensor  # (k, T, D)
    pooled: torch.Tensor  # (k, P)
    negative_embeds: torch.Tensor  # (1, T, D)
    negative_pooled: torch.Tensor  # (1, P)


def eval_sets(trainer) -> dict[str, EvalSet]:
    """Every task's EvalSet: rows of the training cache (held out), or its eval.prompts file encoded by the training
    encoder into the cache's eval/ folder (rank 0 first, as the training sets). Every rank calls it."""
    from opd_fast import distributed
    from opd_fast.run import encode_task_prompts

    cfg = trainer.cfg
    encoded = dict(trainer.prompts)
    own = [task for task in cfg.tasks if task.name in cfg.eval.prompts]
    if own:
        files = copy.deepcopy(cfg)
        files.tasks = [dataclasses.replace(task, prompts=cfg.eval.prompts[task.name]) for task in own]
        cache = Path(cfg.prompts.cache_dir) if cfg.prompts.cache_dir else Path(trainer.out_dir) / "embeddings"
        with distributed.rank_zero_first(trainer.dist):
            encoded.update(encode_task_prompts(files, trainer.family, trainer.student, cache / "eval"))
    sets = {}
    for i, task in enumerate(cfg.tasks):
        e = encoded[task.name]
        rows = held_out(cfg, i, len(e.prompts.prompts))
        meta = e.prompts.metadata or [{} for _ in e.prompts.prompts]
        sets[task.name] = EvalSet(
            task.name,
            rows.tolist(),
            [e.prompts.prompts[j] for j in rows.tolist()],
            [meta[j] for j in rows.tolist()],
            e.embeds[rows.to(e.embeds.device)].float().cpu(),
            e.pooled[rows.to(e.pooled.device)].float().cpu(),
            e.negative_embeds.float().cpu(),
            e.negative_pooled.float().cpu(),
        )
    return sets


# -- scoring in the background -----------------------------------------------------------------------------------


class _Job:
    def __init__(self, step: int, model: str, run):
        self.step, self.model, self.run = step, model, run
        self.done = threading.Event()
        self.result: dict | None = None


class _Worker:
    """One daemon thread that runs jobs in order (rewards are not shared across threads, and a hung one cannot keep
    the process from exiting)."""

    def __init__(self):
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="opd-eval-scoring", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job.result = job.run()
            except Exception as e:  # noqa: BLE001 - an evaluation never ends the run
                log.warning("evaluation of %s at step %d failed: %s", job.model, job.step, _first_line(e))
            finally:
                job.done.set()


class EvalHook(Hook):
    """In-training evaluation as the run config's eval section says (module docstring). rewards: reward objects by
    name (e.g. a custom one) used instead of building eval.rewards entries of that name."""

    def __init__(self, rewards: dict | None = None):
        self.given = dict(rewards or {})
        self.built: dict[str, object] = {}  # spec entry (JSON) -> reward, built on rank 0's worker thread
        self.trainer = None
        self.sets: dict[str, EvalSet] | None = None
        self.pipe = None
        self.pending: list[_Job] = []
        self.worker: _Worker | None = None
        self._wandb_axis = False
        self._row_taken = False
        self.wandb_backlog: list[tuple[object, dict]] = []  # (run, scalars) of evaluations W&B has not got yet
        self._warned_shards = False

    # -- the hook points -------------------------------------------------------------------------------------------
    def before_round(self, trainer, round_idx: int) -> None:
        if self.trainer is None:
            self._check(trainer)
            self.trainer = trainer

    def after_record(self, trainer, record: dict) -> None:
        self.trainer = trainer
        self._row_taken = False  # W&B's current row is this round's (MetricsWriter logged it), with no evaluation
        ev, step = trainer.cfg.eval, record["step"]
        due = (ev.every and step % ev.every == 0) or (ev.at_end and step == trainer.cfg.train.rounds)
        if due:
            self.evaluate(step)
        self._publish_done()
        self._log_wandb(final=False)

    def close(self) -> None:
        """Wait (at most eval.wait_s) for the evaluations still being scored, and record them."""
        if self.trainer is None:
            return
        deadline = time.monotonic() + self.trainer.cfg.eval.wait_s
        for job in self.pending:
            job.done.wait(max(0.0, deadline - time.monotonic()))
        self._publish_done()
        for job in self.pending:
            log.warning(
                "the evaluation of %s at step %d was still being scored after eval.wait_s=%gs: not recorded",
                job.model,
                job.step,
                self.trainer.cfg.eval.wait_s,
            )
        self.pending = []
        self._log_wandb(final=True)

    # -- one evaluation ----------------------------------------------------------------------------------------------
    def _check(self, trainer) -> None:
        """What the config cannot check alone, before the first round: a ConfigError rather than a late warning."""
        from opd_fast.text_encoders import check_pipeline_folder

        cfg = trainer.cfg
        if not cfg.eval.enabled:
            raise ConfigError("EvalHook: the config's eval section evaluates nothing (set eval.every or eval.at_end)")
        check_pipeline_folder(cfg.eval.pipeline or cfg.model.path, trainer.family)

    def _pipeline(self, trainer):
        """The family's pipeline around the student module itself (weights as they are when it runs), with the VAE
        and scheduler of the pipeline folder and no text encoders (the prompts come encoded)."""
        from opd_fast.models import DTYPES

        cfg, family = trainer.cfg, trainer.family
        pipe = family.pipeline_class.from_pretrained(
            cfg.eval.pipeline or cfg.model.path,
            **family.pipeline_components(trainer.student),
            dtype=DTYPES[cfg.model.dtype],
            local_files_only=True,
            **dict.fromkeys(family.text_components),
        )
        pipe.vae.to(trainer.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def evaluate(self, step: int) -> None:
        """Sample every model of eval.models at the current weights (every rank), log the grids and queue the scoring
        (rank 0)."""
        trainer = self.trainer
        if self.sets is None:
            self.sets = eval_sets(trainer)
            self.pipe = self._pipeline(trainer)
        for model in self._models(trainer):
            t0 = time.perf_counter()
            images = self._generate(model)
            seconds = time.perf_counter() - t0
            if not trainer.dist.is_main:
                continue
            self._log_grids(step, model, images)
            if self.worker is None:
                self.worker = _Worker()
            job = _Job(step, model, None)
            job.run = lambda images=images, job=job, seconds=seconds: self._score(job, images, seconds)
            self.pending.append(job)
            self.worker.jobs.put(job)

    def _models(self, trainer) -> list[str]:
        """eval.models, but the student for the EMA of a sharded (ZeRO-3) student: its EMA shards cannot be swapped
        into the gathered weights yet (EMA.swapped_in), and a run is not stopped for it (a warning, once)."""
        models = list(trainer.cfg.eval.models)
        if "ema" in models and trainer.engine.params_are_shards:
            if not self._warned_shards:
                log.warning(
                    "eval.models: the EMA of a sharded (ZeRO-3) student cannot be sampled yet; the student's own "
                    "weights are evaluated instead (recorded as model 'student')"
                )
                self._warned_shards = True
            models = list(dict.fromkeys("student" if m == "ema" else m for m in models))
        return models

    def _generate(self, model: str) -> dict[str, list] | None:
        """task -> its images (PIL, a prompt's seeds side by side) on rank 0; None on the other ranks."""
        import contextlib

        import numpy as np
        from PIL import Image

        from opd_fast.models import DTYPES

        trainer = self.trainer
        cfg, dist, family, ev = trainer.cfg, trainer.dist, trainer.family, trainer.cfg.eval
        dtype, device = DTYPES[cfg.model.dtype], trainer.device
        resolution = ev.resolution or cfg.sampling.resolution
        # the student's own: a two-expert model's is a scale per expert (student.guidance_2)
        guidance = ev.guidance if ev.guidance is not None else trainer.student_guidance
        weights = trainer.ema.swapped_in() if model == "ema" else contextlib.nullcontext()
        autocast = (
            torch.autocast(device.type, dtype=trainer.student_autocast)
            if trainer.student_autocast is not None
            else contextlib.nullcontext()
        )
        out = {}
        with trainer.engine.gathered(), weights, autocast, torch.no_grad():
            for t_idx, (task, s) in enumerate(self.sets.items()):
                items = [(p, k) for p in range(len(s.prompts)) for k in range(ev.seeds)]
                mine = rank_share(len(items), dist.rank, dist.world_size)
                local = []
                for start in range(mine.start, mine.stop, ev.batch_size):
                    chunk = items[start : min(start + ev.batch_size, mine.stop)]
                    rows = [p for p, _ in chunk]
                    generators = [
                        torch.Generator("cpu").manual_seed(_seed(ev.seed, t_idx, s.indices[p], k, 3)) for p, k in chunk
                    ]
                    text = family.sampling_inputs(
                        s.embeds[rows].to(device, dtype),
                        s.pooled[rows].to(device, dtype),
                        s.negative_embeds.to(device, dtype),
                        s.negative_pooled.to(device, dtype),
                        family.no_guidance if guidance is None else guidance,
                    )
                    output = self.pipe(
                        **text,
                        num_inference_steps=ev.num_steps,
                        height=resolution,
                        width=resolution,
                        generator=generators,
                        output_type="pil",
                    )
                    images = family.output_images(output)
                    local += [np.asarray(image.convert("RGB")) for image in images]
                gathered = gather_images(local, len(items), (resolution, resolution), dist)
                if gathered is not None:
                    out[task] = [Image.fromarray(array) for array in gathered]
        return out if dist.is_main else None

    def _log_grids(self, step: int, model: str, images: dict[str, list]) -> None:
        metrics = self.trainer.metrics
        if metrics is None:
            return
        for task, task_images in images.items():
            prompts = self.sets[task].prompts
            caption = f"{model} at step {step}, a row per prompt: " + " | ".join(prompts)
            metrics.log_image_grid(step, f"samples/{model}/{task}", task_images, self.trainer.cfg.eval.seeds, caption)

    def _reward(self, entry: dict):
        """The reward of a spec entry, built once; None (and a warning) when it cannot be built: tried again at the
        next evaluation."""
        from opd_fast.evaluate.registry import build_reward

        if entry["name"] in self.given:
            return self.given[entry["name"]]
        key = json.dumps(entry, sort_keys=True)
        if key not in self.built:
            try:
                self.built[key] = build_reward(entry["name"], **{k: v for k, v in entry.items() if k != "name"})
            except Exception as e:  # noqa: BLE001 - a missing model or package is a warning, not a lost run
                log.warning(
                    "evaluation: reward %r could not be built (%s); tried again at the next evaluation",
                    entry["name"],
                    _first_line(e),
                )
                return None
        return self.built[key]

    def _score(self, job: _Job, images: dict[str, list], seconds: float) -> dict | None:
        """The evaluation record of one model's images (on the worker thread); None when no reward scored."""
        from opd_fast.evaluate.base import RewardError

        t0 = time.perf_counter()
        ev = self.trainer.cfg.eval
        rewards: dict[str, dict[str, float]] = {}
        for task, task_images in images.items():
            s = self.sets[task]
            prompts = [s.prompts[i // ev.seeds] for i in range(len(task_images))]
            metadata = [s.metadata[i // ev.seeds] for i in range(len(task_images))]
            for entry in ev.rewards.get(task, []) + ev.rewards.get("*", []):
                reward = self._reward(entry)
                if reward is None:
                    continue
                try:
                    values = [float(v) for v in reward.score(task_images, prompts, metadata)]
                    if len(values) != len(task_images):
                        raise RewardError(f"returned {len(values)} scores for {len(task_images)} images")
                    score = float(reward.aggregate(values, metadata))
                except Exception as e:  # noqa: BLE001 - a server down or a bad image: a warning, tried next time
                    log.warning(
                        "evaluation of %s at step %d: reward %r failed on task %r (%s); tried again at the next "
                        "evaluation",
                        job.model,
                        job.step,
                        entry["name"],
                        task,
                        _first_line(e),
                    )
                    continue
                rewards.setdefault(task, {})[entry["name"]] = score
        if not rewards:
            log.warning("evaluation of %s at step %d: no reward scored; nothing recorded", job.model, job.step)
            return None
        in_domain = {task: [task] for task, scores in rewards.items() if task in scores}
        record = {
            "step": job.step,
            "model": job.model,
            "seconds": seconds + time.perf_counter() - t0,
            "rewards": rewards,
            "in_domain": in_domain,
        }
        return record

    # -- results, on the main thread -------------------------------------------------------------------------------
    def _publish_done(self) -> None:
        """Record the evaluations whose scoring is done, in the order they were taken."""
        while self.pending and self.pending[0].done.is_set():
            job = self.pending.pop(0)
            if job.result is not None:
                self._publish(job.result)

    def _publish(self, record: dict) -> None:
        from opd_fast.evaluate.records import column_name, write_eval_record

        trainer = self.trainer
        write_eval_record(trainer.out_dir, record)
        prefix = f"eval/{record['model']}/"
        scalars = {
            prefix + column_name(task, reward): score
            for task, scores in record["rewards"].items()
            for reward, score in scores.items()
        }
        scalars[prefix + "seconds"] = record["seconds"]
        metrics = trainer.metrics
        if metrics is None:
            return
        # a line of its own in metrics.jsonl, at the evaluated step (after later rounds' lines: it arrived then)
        with open(metrics.path, "a") as f:
            f.write(json.dumps({"step": record["step"], **scalars}) + "\n")
        for tracker in metrics.trackers:
            if tracker.name == "wandb":
                self.wandb_backlog.append((tracker.run, {**scalars, "eval/step": record["step"]}))
            else:
                tracker.log_scalars(record["step"], scalars)

    def _log_wandb(self, final: bool) -> None:
        """W&B: one evaluation per row, into the current row (the latest round's), with eval/step, the x axis of
        every eval/* chart. Not committed while rounds go on: the next round still gets its own step, and two
        evaluations in one row would overwrite each other, so the others wait for the next rounds' rows. final: the
        rounds are over, each waiting one gets a row of its own (committed, after the last round's)."""
        if not final and self._row_taken:
            return
        while self.wandb_backlog:
            run, scalars = self.wandb_backlog.pop(0)
            if not self._wandb_axis:
                run.define_metric("eval/step")
                run.define_metric("eval/*", step_metric="eval/step")
                self._wandb_axis = True
            if final and self._row_taken:  # the last round's row holds one already: close it
                run.log({}, commit=True)
            run.log(scalars, commit=final)
            self._row_taken = True
            if not final:
                return
