"""DeepSpeed ZeRO stage 0-3 over the trainable parameters, optional CPU offload, bf16.

The client optimizer is our torch AdamW (DeepSpeed's CPU Adam when offloading and it builds). Teachers are never
given to DeepSpeed (never partitioned or trained). gradient_accumulation_steps stays 1: the engine marks the round's
last backward as the boundary itself (AccumulatingEngine). Where the weights and Adam's state live depends on the
stage; one ZeroState, chosen once by stage, translates them to and from the engine-independent full state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from abc import ABC, abstractmethod

import torch

from opd_fast import distributed
from opd_fast.config import OptimizerConfig, RunConfig
from opd_fast.distributed import DistInfo
from opd_fast.engine.accumulate import AccumulatingEngine, RoutedForward
from opd_fast.engine.base import load_optimizer_state, make_optimizer, trainable_parameters

log = logging.getLogger(__name__)

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class DeepSpeedEngine(AccumulatingEngine):
    """ZeRO stage 0-3 (see the module docstring); the full state goes through `self.zero` (a ZeroState)."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, info: DistInfo):
        import deepspeed

        super().__init__(cfg, info)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-step INFO lines would flood the log
        # ZeRO calls torch.distributed.all_gather_into_tensor / reduce_scatter_tensor, which torch now deprecates: under
        # torchrun that printed ~10 FutureWarnings per round, none a user can act on.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.model = model
        self.names, trainable = trainable_parameters(model)
        self.stage = cfg.engine.resolved_zero_stage(cfg.student.lora.enabled)
        cpu_adam = cfg.engine.offload != "none" and _cpu_adam_builds()
        # Offloading runs DeepSpeed's own CPU Adam (declared in the config); otherwise our torch AdamW.
        client = None if cpu_adam else make_optimizer(trainable, cfg.optimizer)
        self.ds, *_ = deepspeed.initialize(
            model=model,
            optimizer=client,
            config=deepspeed_config(cfg, self.stage, cpu_adam),
            dist_init_required=False,
            model_parameters=trainable if client is None else None,
        )
        self.zero = zero_state_class(self.stage, cfg.engine.bf16)(self.ds, model, trainable, info, cfg.optimizer)
        self.params, self.params_are_shards = self.zero.params, self.zero.params_are_shards
        self.forward_model = RoutedForward(model, self.ds)
        self._arm_sync()
        log.info(
            "deepspeed engine: ZeRO-%d%s, offload %s, %d backward calls per optimizer step",
            self.stage,
            " bf16" if cfg.engine.bf16 else "",
            cfg.engine.offload,
            self.backwards_per_round,
        )

    # -- the round -------------------------------------------------------------------------------------------------
    def _set_sync(self, armed: bool) -> None:
        # Only the boundary's backward reduces gradients across ranks at stages 0-1 (stages 2-3 reduce-scatter at
        # every backward: that is their memory saving); step() updates only at a boundary.
        self.ds.set_gradient_accumulation_boundary(armed)

    def _backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def _step(self) -> float | None:
        return self.zero.step()

    def _drop_gradients(self) -> None:
        self.ds.zero_grad()
        if hasattr(self.ds.optimizer, "zero_grad"):
            self.ds.optimizer.zero_grad(set_to_none=True)
        self.zero.drop_accumulated()

    def _param_groups(self) -> list[dict]:
        # as DeepSpeed's own schedulers set the rate: the wrapper's groups are the base optimizer's
        return self.ds.optimizer.param_groups

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master weights, the tensors the base optimizer steps."""
        return self.zero.master_partitions()

    # -- full state ------------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.zero.trainable_state(self.names)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.zero.load_trainable_state([state[n] for n in self.names])

    def state_dict(self) -> dict:
        return self.zero.state_dict(self.lr)

    def load_state_dict(self, state: dict) -> None:
        self.zero.load_state_dict(state)

    def gather(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.zero.gather(local)

    def shard(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.zero.shard(full)

    def gathered(self) -> contextlib.AbstractContextManager:
        return self.zero.gathered()


def zero_state_class(stage: int, bf16: bool) -> type[ZeroState]:
    """The ZeroState of a stage: where the fp32 master weights and Adam's state live."""
    if stage == 3:
        return Zero3State
    if stage == 0 and not bf16:
        return PlainState
    return MasterCopyState


class ZeroState(ABC):
    """How DeepSpeed holds the weights and Adam's state at one stage, translated to and from the engine's full
    state (Engine's contract: full fp32 tensors on rank 0, the optimizer in torch AdamW's layout over them). Also
    the step, whose gradient norm only DeepSpeed's own optimizer wrappers check and report."""

    params_are_shards = False

    def __init__(
        self, ds, model: torch.nn.Module, trainable: list[torch.nn.Parameter], info: DistInfo, opt_cfg: OptimizerConfig
    ):
        self.ds, self.model, self.trainable, self.info, self.opt_cfg = ds, model, trainable, info, opt_cfg
        self.params: list[torch.Tensor] = trainable  # what the EMA tracks

    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch-style optimizer over DeepSpeed's fp32 master partitions (or over the parameters: PlainState)."""
        return getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master weights, the tensors the base optimizer steps. ZeRO-3 hands them to it one
        sub-group at a time (its param_groups are empty between steps), the others keep them in param_groups."""
        flats = getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", None)
        if flats is not None:
            return list(flats)
        return [t for g in self.base_optimizer().param_groups for t in g["params"]]

    def step(self) -> float | None:
        self.ds.step()  # ZeRO 1-3 and bf16 skip the update themselves when the global norm is not finite
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return norm if math.isfinite(norm) else None

    @abstractmethod
    def trainable_state(self, names: list[str]) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_trainable_state(self, values: list[torch.Tensor]) -> None:
        """`values`: full tensors in the order of the trainable parameters."""

    @abstractmethod
    def state_dict(self, lr: float) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def gather(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        return local

    def shard(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        return full

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def drop_accumulated(self) -> None:
        """Forget the gradient accumulated so far in the round, wherever this stage keeps it beyond the parameters'
        .grad (which zero_grad() clears)."""


class PlainState(ZeroState):
    """Stage 0 in fp32: DeepSpeed hands the client optimizer the parameters as they are (no master copy, no overflow
    check), so the module's parameters and the torch AdamW are already the full state."""

    def step(self) -> float | None:
        # DeepSpeed neither checks nor reports the norm here; the gradients are all-reduced
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if not math.isfinite(norm):
            self.ds.zero_grad()
            return None
        self.ds.step()
        return norm

    def trainable_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(names, self.trainable)}

    @torch.no_grad()
    def load_trainable_state(self, values: list[torch.Tensor]) -> None:
        for p, value in zip(self.trainable, values):
            p.data.copy_(value.to(p.device))

    def state_dict(self, lr: float) -> dict:
        return self.base_optimizer().state_dict()

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.base_optimizer(), state)


class MasterCopyState(ZeroState):
    """Stages 1-2, and stage 0 with bf16: DeepSpeed keeps an fp32 master copy of the weights (partitioned at
    stages 1-2) beside the module's compute copy, read and written whole through deepspeed.utils' safe_get_full_* /
    safe_set_full_* (collectives)."""

    def drop_accumulated(self) -> None:
        """ZeRO-1/2 accumulate a round's backward calls in buffers of their own that their zero_grad() leaves:
        all_grad_tensors until the boundary, averaged_gradients (with bf16 weights) until the step. A dropped round
        (a non-finite loss) would otherwise add its gradient, NaN included, to the next round's. Cleared as
        DeepSpeed's own step clears them on an overflow (tests/test_engine.py holds both cases)."""
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        opt = self.ds.optimizer
        if not isinstance(opt, DeepSpeedZeroOptimizer):
            return
        opt._release_preflattened_grad_buffers()
        if opt.cpu_offload:
            opt.reset_cpu_buffers()
            return
        for buffers in (opt.averaged_gradients, opt.all_grad_tensors):
            for group in buffers:
                buffers[group] = None

    def full(self, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
        """Full fp32 value of p's master weight (key None) or of its optimizer state `key` (collective)."""
        from deepspeed import utils as ds

        full = ds.safe_get_full_fp32_param(p) if key is None else ds.safe_get_full_optimizer_state(p, key)
        return full.view(p.shape)

    def set_full(self, p: torch.nn.Parameter, key: str | None, value: torch.Tensor) -> None:
        from deepspeed import utils as ds

        value = value.float()
        ds.safe_set_full_fp32_param(p, value) if key is None else ds.safe_set_full_optimizer_state(p, value, key)

    def set_compute_copy(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """The module's own tensor, which the forward reads: full below stage 3."""
        p.data.copy_(value)

    def trainable_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        full = {n: self.full(p, None).cpu() for n, p in zip(names, self.trainable)}
        return full if self.info.rank == 0 else {}

    @torch.no_grad()
    def load_trainable_state(self, values: list[torch.Tensor]) -> None:
        for p, value in zip(self.trainable, values):
            value = value.to(p.device)
            self.set_full(p, None, value)
            self.set_compute_copy(p, value)

    def state_dict(self, lr: float) -> dict:
        base = self.base_optimizer()
        groups = [
            {
                **make_optimizer([torch.zeros(1)], self.opt_cfg).state_dict()["param_groups"][0],
                "lr": lr,
                "params": list(range(len(self.trainable))),
            }
        ]
        if not base.state:  # no step taken yet
            return {"state": {}, "param_groups": groups}
        step = float(next(iter(base.state.values()))["step"])
        state = {}
        for i, p in enumerate(self.trainable):
            moments = {key: self.full(p, key).cpu() for key in ADAM_MOMENTS}
            state[i] = {"step": torch.tensor(step), **moments}
        return {"state": state if self.info.rank == 0 else {}, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        if not state["state"]:
            return
        base = self.base_optimizer()
        self._materialize_optimizer_state()
        for i, p in enumerate(self.trainable):
            for key in ADAM_MOMENTS:
                self.set_full(p, key, state["state"][i][key].to(p.device))
        step = float(state["state"][0]["step"])
        for per_tensor in base.state.values():
            old = per_tensor["step"]
            per_tensor["step"] = (
                torch.tensor(step, dtype=old.dtype, device=old.device) if torch.is_tensor(old) else int(step)
            )

    def _materialize_optimizer_state(self) -> None:
        """Adam creates its state lazily at the first step, and DeepSpeed links its per-parameter views of that state
        afterwards; a resume before any step needs both now. Zero moments and step 0 are exactly Adam's lazy init."""
        base = self.base_optimizer()
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


class Zero3State(MasterCopyState):
    """Stage 3: a parameter is flattened, padded to world_size equal pieces, and rank r keeps piece r (p.ds_tensor)
    of the weight and of its master copy and moments. The full values go through our own gather and shard of the
    local pieces, exact for sizes that do not split evenly; the EMA tracks the pieces."""

    params_are_shards = True

    def __init__(
        self, ds, model: torch.nn.Module, trainable: list[torch.nn.Parameter], info: DistInfo, opt_cfg: OptimizerConfig
    ):
        super().__init__(ds, model, trainable, info, opt_cfg)
        self.params = [p.ds_tensor for p in trainable]

    def _gather_one(self, local: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        return distributed.all_gather_flat(local.float(), self.info)[: p.ds_numel].view(p.ds_shape)

    def _shard_one(self, full: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        size = p.ds_tensor.numel()
        piece = full.detach().flatten()[self.info.rank * size : (self.info.rank + 1) * size]
        return torch.nn.functional.pad(piece, (0, size - piece.numel()))

    def full(self, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
        from deepspeed import utils as ds

        local = ds.safe_get_local_fp32_param(p) if key is None else ds.safe_get_local_optimizer_state(p, key)
        return self._gather_one(local, p)

    def set_full(self, p: torch.nn.Parameter, key: str | None, value: torch.Tensor) -> None:
        from deepspeed import utils as ds

        local = self._shard_one(value.float(), p)
        ds.safe_set_local_fp32_param(p, local) if key is None else ds.safe_set_local_optimizer_state(p, local, key)

    def set_compute_copy(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """This rank's piece, plus the full tensor where ZeRO-3 keeps a small parameter gathered (persistent)."""
        p.ds_tensor.copy_(self._shard_one(value, p))
        if p.data.numel() == p.ds_numel:
            p.data.copy_(value.view_as(p.data))

    def gather(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        full = [self._gather_one(t, p).cpu() for t, p in zip(local, self.trainable)]
        return full if self.info.rank == 0 else [torch.empty(0)] * len(full)

    def shard(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._shard_one(t, p) for t, p in zip(full, self.trainable)]

    def gathered(self) -> contextlib.AbstractContextManager:
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
