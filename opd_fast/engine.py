"""The student update: gradient accumulation over a round, clipping, one optimizer step, EMA.

A round calls backward(loss) many times (trained steps x tasks x micro-batches) and step() once. Three engines share
the surface the trainer uses: forward_model (what models.velocity calls), backward(loss), step() -> pre-clip gradient
norm or None (no step: not finite), zero_grad() (drop the round's gradients), rank/world_size, lr, average(t) (mean
over ranks), and for checkpoints and export the FULL state on rank 0 in one layout whatever the engine:
trainable_state() {name: fp32 tensor}, state_dict() (torch AdamW's layout over those tensors), and their load_*
twins. So a checkpoint written by ZeRO-3 on 8 GPUs resumes in one CPU process and vice versa. `params` are the tensors
EMA tracks: the trainable parameters, or under ZeRO-3 this rank's shards of them (gather()/shard() convert).

- SingleEngine: one process, torch AdamW.
- DDPEngine: torch DistributedDataParallel; every backward but the round's last runs without sync (what no_sync()
  does), so the gradients are all-reduced once per round.
- DeepSpeedEngine: ZeRO stage 0-3, optional CPU offload, bf16; a client torch AdamW (DeepSpeed's CPU Adam when
  offloading). gradient_accumulation_steps stays 1 and the round's last backward is marked as the boundary.

Both wrappers act in their forward (DDP decides there whether the next backward syncs; DeepSpeed advances its
micro-step there, without which ZeRO-3 overwrites instead of accumulating the gradients of a round's backward calls),
so the student's forward must go through them: forward_model routes calls to the wrapper and attribute reads
(config, parameters) to the module. The engines count backward calls to know the round's last one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import torch

from opd_fast import distributed
from opd_fast.config import EMAConfig, OptimizerConfig, RunConfig
from opd_fast.distributed import DistInfo

log = logging.getLogger(__name__)


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """torch AdamW; fused (one kernel for every tensor) when all the tensors are on a GPU, where the default
    per-tensor loop would launch several kernels per parameter (the official LoRA has ~380 of them). The CPU keeps
    torch's default, so CPU runs are bit for bit what they were."""
    params = list(params)
    fused = bool(params) and all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused or None
    )


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")  # how this machine runs the update, not the run's state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this optimizer's implementation flags: torch restores them from the
    checkpoint, so a CPU run's checkpoint would switch a GPU resume off the fused kernel (and the reverse)."""
    flags = [{k: group[k] for k in IMPLEMENTATION_KEYS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)


def lr_at(cfg: OptimizerConfig, round_idx: int, rounds: int) -> float:
    """The learning rate of round `round_idx` (0-based) of `rounds`: a function of the round alone, so a resumed run
    continues the schedule without saving it. cosine anneals towards 0 over the run: the last rounds average out the
    gradient noise that a constant rate leaves in the weights."""
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(round_idx / rounds, 1.0)))


def backwards_per_round(cfg: RunConfig) -> int:
    """The trainer's backward calls per round: every trained step of every micro-batch of every task, or with
    train.task_batching (the tasks' micro-batches in one batch) every trained step of the longest task."""
    steps = [cfg.trained_steps(task) for task in cfg.tasks]
    return (max(steps) if cfg.train.task_batching else sum(steps)) * cfg.train.micro_batches_per_task


def make_engine(cfg: RunConfig, model: torch.nn.Module, info: DistInfo | None = None):
    """The engine `cfg.engine.kind` names, over `model`'s trainable parameters; `info` from distributed.setup()
    (which joins the launcher's process group; called here when not given)."""
    info = info if info is not None else distributed.setup(cfg.engine)
    if cfg.engine.kind == "single":
        return SingleEngine(model, cfg.optimizer)
    if cfg.engine.kind == "ddp":
        return DDPEngine(model, cfg, info)
    return DeepSpeedEngine(model, cfg, info)


def _trainable(model: torch.nn.Module) -> tuple[list[str], list[torch.nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the student has no trainable parameters")
    return [n for n, _ in named], [p for _, p in named]


class _RoutedForward:
    """The student as models.velocity uses it: calls go through the engine's wrapper, attributes are the module's."""

    def __init__(self, module: torch.nn.Module, wrapper: torch.nn.Module):
        self.module, self.wrapper = module, wrapper

    def __call__(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


class _RoundCounter:
    """Counts a round's backward calls: the engine must know which one is the last (it syncs the gradients)."""

    def __init__(self, per_round: int):
        self.per_round = per_round
        self.done = 0

    def backward(self) -> None:
        self.done += 1
        if self.done > self.per_round:
            raise RuntimeError(
                f"backward call {self.done} in one round; the engine was built for {self.per_round} "
                "(trained steps x tasks x micro-batches)"
            )

    @property
    def next_is_last(self) -> bool:
        return self.done == self.per_round - 1

    def step(self) -> None:
        if self.done != self.per_round:
            raise RuntimeError(
                f"step() after {self.done} backward calls; the engine was built for {self.per_round} "
                "per round, so the gradient sync point was missed"
            )
        self.done = 0


@contextlib.contextmanager
def values_swapped_in(params: list[torch.Tensor], values: list[torch.Tensor]):
    """Temporarily copy `values` into `params` (same shapes); the parameters' own values are put back after."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


class EMA:
    """The official schedule (Flow-GRPO's EMAModuleWrapper): called with s, the optimizer steps taken so far (the
    trainer calls it after each step: s = 1, 2, ...); when (s + 1) % update_every == 0,
    ema += (1 - d) (p - ema) with d = min((1 + s) / (10 + s), decay).

    `params` may be shards (ZeRO-3); then `engine` gathers state_dict() to full tensors on rank 0 and load_state_dict()
    takes full tensors and keeps this rank's shard."""

    def __init__(self, params: list[torch.Tensor], cfg: EMAConfig, engine=None):
        self.params = params
        self.cfg = cfg
        self.engine = engine
        self.shadow = [p.detach().clone().float() for p in params]

    def decay(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.cfg.decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        if (step + 1) % self.cfg.update_every:
            return
        # one multi-tensor kernel for all tensors (a lerp_ per tensor launches ~380 kernels on a GPU)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.decay(step))

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the parameters (e.g. to evaluate them). Not under ZeRO-3, whose
        modules hold shards (and gathered copies of small parameters) this would not reach: export gathers instead."""
        if getattr(self.engine, "stage", None) == 3:
            raise NotImplementedError("EMA.swapped_in under ZeRO-3: gather the EMA (state_dict) and load it instead")
        with values_swapped_in(self.params, self.shadow):
            yield

    def state_dict(self) -> dict[str, torch.Tensor]:
        full = self.shadow if self.engine is None else self.engine.gather(self.shadow)
        return {str(i): s for i, s in enumerate(full)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        full = [state[str(i)] for i in range(len(self.shadow))]
        for s, value in zip(self.shadow, full if self.engine is None else self.engine.shard(full)):
            s.copy_(value)


class SingleEngine:
    """One process, a torch AdamW over the trainable parameters."""

    rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, opt_cfg: OptimizerConfig):
        self.model = model
        self.forward_model = model
        self.names, self.params = _trainable(model)
        self.optimizer = make_optimizer(self.params, opt_cfg)
        self.max_grad_norm = opt_cfg.max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        """Clip and step; returns the pre-clip gradient norm, or None (no step taken) when it is not finite."""
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(norm):
            self.zero_grad()
            return None
        self.optimizer.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def average(self, t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    # -- full state: the same on every engine (rank 0 holds it; other ranks only take part in gathering it) --------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in zip(self.names, self.params):
            p.copy_(state[n])

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, state)

    def gather(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        return local

    def shard(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        return full

    def gathered(self):
        """A context in which every parameter of the model holds its full value (ZeRO-3 gathers them)."""
        return contextlib.nullcontext()


class DDPEngine(SingleEngine):
    """torch DistributedDataParallel: every rank holds the weights and the optimizer; one gradient all-reduce per
    round, overlapped with the round's last backward."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, info: DistInfo):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, cfg.optimizer)
        self.info = info
        self.rank, self.world_size = info.rank, info.world_size
        self.counter = _RoundCounter(backwards_per_round(cfg))
        # DDP broadcasts rank 0's weights at construction. find_unused_parameters: a parameter may get no gradient
        # (e.g. a full-parameter student's unused output layers); DDP looks only in a syncing forward, once a round.
        self.ddp = DistributedDataParallel(
            model,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
        )
        self.forward_model = _RoutedForward(model, self.ddp)
        self._arm_sync()

    def _arm_sync(self) -> None:
        # What no_sync() toggles, set here because the forward runs in the trainer: it applies to the next forward.
        self.ddp.require_backward_grad_sync = self.counter.next_is_last

    def backward(self, loss: torch.Tensor) -> None:
        self.counter.backward()
        loss.backward()
        self._arm_sync()

    def step(self) -> float | None:
        self.counter.step()
        self._arm_sync()
        return super().step()

    def zero_grad(self) -> None:
        self.counter.done = 0
        self._arm_sync()
        super().zero_grad()

    def average(self, t: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(t, self.info) / self.world_size


class DeepSpeedEngine:
    """ZeRO stage 0-3 over the trainable parameters; teachers are never given to it (never partitioned or trained).

    Parameter reads outside a forward go through DeepSpeed's fp32 master copy (safe_get_* / safe_set_* from
    deepspeed.utils): the module's own tensors are empty (ZeRO-3) or a lower-precision copy (bf16)."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, info: DistInfo):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-step INFO lines would flood the log
        # ZeRO calls torch.distributed.all_gather_into_tensor / reduce_scatter_tensor, which torch now deprecates: under
        # torchrun that printed ~10 FutureWarnings per round (42 in a 4-round tiny run), none a user can act on.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.model = model
        self.info = info
        self.rank, self.world_size = info.rank, info.world_size
        self.names, self._trainable = _trainable(model)
        self.stage = cfg.engine.resolved_zero_stage(cfg.student.lora.enabled)
        self.counter = _RoundCounter(backwards_per_round(cfg))
        # Stage 0 in fp32 hands the client optimizer the parameters as they are: no master copy, no overflow check.
        self._plain = self.stage == 0 and not cfg.engine.bf16
        cpu_adam = cfg.engine.offload != "none" and _cpu_adam_builds()
        ds_config = deepspeed_config(cfg, self.stage, cpu_adam)
        # Offloading runs DeepSpeed's own CPU Adam (declared in the config); otherwise our torch AdamW.
        client = None if cpu_adam else make_optimizer(self._trainable, cfg.optimizer)
        self.ds, *_ = deepspeed.initialize(
            model=model,
            optimizer=client,
            config=ds_config,
            dist_init_required=False,
            model_parameters=self._trainable if client is None else None,
        )
        self.opt_cfg = cfg.optimizer
        self.forward_model = _RoutedForward(model, self.ds)
        self.params = [p.ds_tensor for p in self._trainable] if self.stage == 3 else self._trainable
        self._arm_boundary()
        log.info(
            "deepspeed engine: ZeRO-%d%s, offload %s, %d backward calls per optimizer step",
            self.stage,
            " bf16" if cfg.engine.bf16 else "",
            cfg.engine.offload,
            self.counter.per_round,
        )

    # -- the round -------------------------------------------------------------------------------------------------
    def _arm_boundary(self) -> None:
        # Set before the forward and backward it applies to, and kept through step(), which updates only at a
        # boundary. Only the round's last backward reduces gradients across ranks at stages 0-1 (stages 2-3
        # reduce-scatter at every backward: that is their memory saving).
        self.ds.set_gradient_accumulation_boundary(self.counter.done >= self.counter.per_round - 1)

    def backward(self, loss: torch.Tensor) -> None:
        self.counter.backward()
        self.ds.backward(loss)
        self._arm_boundary()

    def step(self) -> float | None:
        self.counter.step()
        try:
            if self._plain:  # DeepSpeed neither checks nor reports the norm here; the gradients are all-reduced
                grads = [p.grad for p in self._trainable if p.grad is not None]
                norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                if not math.isfinite(norm):
                    self.ds.zero_grad()
                    return None
                self.ds.step()
                return norm
            self.ds.step()  # ZeRO 1-3 and bf16 skip the update themselves when the global norm is not finite
            norm = self.ds.get_global_grad_norm()
            norm = float(norm) if norm is not None else math.nan
            return norm if math.isfinite(norm) else None
        finally:
            self._arm_boundary()

    def zero_grad(self) -> None:
        """Drop a round's gradients without a step."""
        self.counter.done = 0
        self._arm_boundary()
        self.ds.zero_grad()
        if hasattr(self.ds.optimizer, "zero_grad"):
            self.ds.optimizer.zero_grad(set_to_none=True)

    def average(self, t: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(t, self.info) / self.world_size

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    @lr.setter
    def lr(self, value: float) -> None:  # as DeepSpeed's own schedulers: the wrapper's groups are the base optimizer's
        for group in self.ds.optimizer.param_groups:
            group["lr"] = value

    # -- full state ------------------------------------------------------------------------------------------------
    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch-style optimizer over DeepSpeed's fp32 master partitions (or over the parameters: plain)."""
        return getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master weights, the tensors the base optimizer steps. ZeRO-3 hands them to it one
        sub-group at a time (its param_groups are empty between steps), the others keep them in param_groups."""
        flats = getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", None)
        return (
            list(flats) if flats is not None else [t for g in self._base_optimizer().param_groups for t in g["params"]]
        )

    def _full(self, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
        """Full fp32 value of p's master weight (key None) or optimizer state `key` (collective)."""
        from deepspeed import utils as ds

        if self.stage == 3:  # our own gather of the local pieces: exact for sizes that do not split evenly
            local = ds.safe_get_local_fp32_param(p) if key is None else ds.safe_get_local_optimizer_state(p, key)
            return self._gather_one(local, p)
        full = ds.safe_get_full_fp32_param(p) if key is None else ds.safe_get_full_optimizer_state(p, key)
        return full.view(p.shape)

    def _set_full(self, p: torch.nn.Parameter, key: str | None, value: torch.Tensor) -> None:
        from deepspeed import utils as ds

        value = value.float()
        if self.stage == 3:
            local = self._shard_one(value, p)
            ds.safe_set_local_fp32_param(p, local) if key is None else ds.safe_set_local_optimizer_state(p, local, key)
        else:
            ds.safe_set_full_fp32_param(p, value) if key is None else ds.safe_set_full_optimizer_state(p, value, key)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self._plain:
            return {n: p.detach() for n, p in zip(self.names, self._trainable)}
        full = {n: self._full(p, None).cpu() for n, p in zip(self.names, self._trainable)}
        return full if self.rank == 0 else {}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Every rank passes the same full tensors: the master copy takes them, then the compute copy (the module's
        own tensors: full below stage 3; at stage 3 this rank's shard, plus the full tensor where ZeRO-3 keeps a
        small parameter gathered)."""
        for n, p in zip(self.names, self._trainable):
            value = state[n].to(p.device)
            if not self._plain:
                self._set_full(p, None, value)
            if self.stage == 3:
                p.ds_tensor.copy_(self._shard_one(value, p))
                if p.data.numel() == p.ds_numel:
                    p.data.copy_(value.view_as(p.data))
            else:
                p.data.copy_(value)

    def state_dict(self) -> dict:
        """Optimizer state in torch AdamW's layout over the full trainable tensors (the SingleEngine layout)."""
        base = self._base_optimizer()
        if self._plain:
            return base.state_dict()
        groups = [
            {
                **make_optimizer([torch.zeros(1)], self.opt_cfg).state_dict()["param_groups"][0],
                "lr": self.lr,
                "params": list(range(len(self._trainable))),
            }
        ]
        if not base.state:  # no step taken yet
            return {"state": {}, "param_groups": groups}
        step = float(next(iter(base.state.values()))["step"])
        state = {}
        for i, p in enumerate(self._trainable):
            moments = {key: self._full(p, key).cpu() for key in ("exp_avg", "exp_avg_sq")}
            state[i] = {"step": torch.tensor(step), **moments}
        return {"state": state, "param_groups": groups} if self.rank == 0 else {"state": {}, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        base = self._base_optimizer()
        if self._plain:
            load_optimizer_state(base, state)
            return
        if not state["state"]:
            return
        self._materialize_optimizer_state()
        for i, p in enumerate(self._trainable):
            for key in ("exp_avg", "exp_avg_sq"):
                self._set_full(p, key, state["state"][i][key].to(p.device))
        step = float(state["state"][0]["step"])
        for per_tensor in base.state.values():
            old = per_tensor["step"]
            per_tensor["step"] = (
                torch.tensor(step, dtype=old.dtype, device=old.device) if torch.is_tensor(old) else int(step)
            )

    def _materialize_optimizer_state(self) -> None:
        """Adam creates its state lazily at the first step, and DeepSpeed links its per-parameter views of that state
        afterwards; a resume before any step needs both now. Zero moments and step 0 are exactly Adam's lazy init."""
        base = self._base_optimizer()
        for flat in self.master_partitions():
            if not base.state.get(flat):
                step = 0 if hasattr(base, "ds_opt_adam") else torch.tensor(0.0)  # DeepSpeed's CPU Adam: an int
                base.state[flat] = {
                    "step": step,
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
        link = getattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # stages 1-2 and bf16
        if link is not None:
            link()

    # -- ZeRO-3 shards ---------------------------------------------------------------------------------------------
    # A ZeRO-3 parameter is flattened, padded to world_size equal pieces, and rank r keeps piece r (p.ds_tensor).
    def _gather_one(self, local: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        return distributed.all_gather_flat(local.float(), self.info)[: p.ds_numel].view(p.ds_shape)

    def _shard_one(self, full: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        size = p.ds_tensor.numel()
        piece = full.detach().flatten()[self.rank * size : (self.rank + 1) * size]
        return torch.nn.functional.pad(piece, (0, size - piece.numel()))

    def gather(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.stage != 3:
            return local
        full = [self._gather_one(t, p).cpu() for t, p in zip(local, self._trainable)]
        return full if self.rank == 0 else [torch.empty(0)] * len(full)

    def shard(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.stage != 3:
            return full
        return [self._shard_one(t, p) for t, p in zip(full, self._trainable)]

    def gathered(self):
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))


def _cpu_adam_builds() -> bool:
    """DeepSpeed's CPU Adam is a C++ op compiled on first use (g++, and the CUDA headers on a CUDA machine)."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()
        return True
    except (ImportError, OSError, RuntimeError) as e:  # no compiler or headers: offload still works, torch's AdamW
        log.warning(
            "DeepSpeed's CPU Adam does not build here (%s); offloaded optimizer steps run torch's AdamW on "
            "the CPU instead (same update, slower)",
            str(e).strip().splitlines()[0] if str(e).strip() else e,
        )
        return False


def deepspeed_config(cfg: RunConfig, stage: int, cpu_adam: bool) -> dict:
    """DeepSpeed's JSON config from ours. The batch keys only feed DeepSpeed's throughput log (the trainer drives the
    batches); gradient_accumulation_steps stays 1 because backward() marks the round's boundary itself."""
    engine, opt = cfg.engine, cfg.optimizer
    zero: dict = {"stage": stage}
    pin = torch.cuda.is_available()
    if engine.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if engine.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = engine.persistence_threshold
    config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": opt.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.bf16},
        # A round sums many backward calls: accumulate them in fp32 even when the weights are bf16.
        **({"data_types": {"grad_accum_dtype": "fp32"}} if engine.bf16 else {}),
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }
    if cpu_adam:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay},
        }
    elif engine.offload != "none":
        config["zero_force_ds_cpu_optimizer"] = False  # DeepSpeed refuses a client optimizer with offload otherwise
    return config
