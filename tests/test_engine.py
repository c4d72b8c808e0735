"""The multi-process engines' accumulation contract, in this process (a one-rank gloo group): DDP and DeepSpeed ZeRO
stages 0-3, fp32, over a small module with a frozen layer between two trained ones.

A round is N backward calls then one step(). The engine arms its wrapper's gradient sync (DDP's
require_backward_grad_sync, DeepSpeed's accumulation boundary) only for the round's last backward and keeps it
through step(); a step() before the last backward and a backward past the last one raise, naming the counts;
zero_grad() drops the round (whole, as the trainer drops one) and starts counting again. Against an independent
reference (a copy of the module, each call's gradient taken by torch.autograd.grad, summed, clipped by torch and
stepped by torch's AdamW), the
accumulated gradient is the sum over the round's calls, step() returns its norm before clipping, and the weights and
Adam's state after the step are the reference's, read in the one layout every engine shares (torch AdamW's
state_dict over the full tensors). Loading a state makes the next step continue from it, as from the reference.
The EMA asks the engine whether its tensors are shards (ZeRO-3) and reads them full through it. ZeRO-2 keeps the
round's gradient in buffers of its own that DeepSpeed's zero_grad() leaves: a dropped round (partial in fp32, whole
with bf16 weights) must not reach the next round's gradient.

Tolerances: the engines accumulate the same fp32 terms in the same order (the gradients agree bit for bit here, but
DeepSpeed sums the squares of the norm in its own order): 1e-6 relative on the gradients and the norm; the weights
and Adam's moments after a step (lr 3e-3 moves every weight by ~3e-3) to 1e-5 relative and 1e-7 absolute.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from opd_fast import distributed
from opd_fast.config import EMAConfig, EngineConfig, load_config
from opd_fast.engine import EMA, DDPEngine, DeepSpeedEngine, Engine, backwards_per_round, make_engine

pytest.importorskip("deepspeed")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
# num_steps 2: one trained step per task, 3 tasks: N = 3 backward calls per round (a first, a middle and a last one)
KINDS = {
    "ddp": ["engine.kind=ddp"],
    **{f"zero{s}": ["engine.kind=deepspeed", f"engine.zero_stage={s}"] for s in range(4)},
}
GRAD = dict(rtol=1e-6, atol=0.0)
STATE = dict(rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def group():
    """A one-rank gloo group for this module's tests, gone afterwards (with the variables setup() exports)."""
    # DeepSpeed's ZeRO-3 replaces torch.nn.functional.linear for the whole process (its memory-efficient linear,
    # "until manually reset"): put it back, or every later test in this process runs its Linear layers through it
    linear = torch.nn.functional.linear
    with mock.patch.dict(os.environ):
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
        created = not torch.distributed.is_initialized()
        info = distributed.setup(EngineConfig(kind="deepspeed"), "cpu")
        try:
            yield info
        finally:
            torch.nn.functional.linear = linear
            if created:
                distributed.shutdown()


def student() -> torch.nn.Module:
    """Trained layers around a frozen one (like a LoRA student's frozen base); sizes that split into no round pieces."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5)
    )
    model[2].requires_grad_(False)
    return model


def batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)) for _ in range(n)]


def loss_of(model, batch) -> torch.Tensor:
    x, target = batch
    dtype = next(model.parameters()).dtype  # bf16 weights under engine.bf16
    return 3.0 * (model(x.to(dtype)).float() - target).square().sum()  # norm ~10: max_grad_norm 1 clips


class Reference:
    """The update spelled out: each call's gradient separately, summed, torch's clip and torch's AdamW."""

    def __init__(self, model: torch.nn.Module, cfg):
        self.model = copy.deepcopy(model)
        self.named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            self.named.values(), lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, eps=opt.eps
        )
        self.max_grad_norm = opt.max_grad_norm

    def gradient(self, round_batches) -> list[torch.Tensor]:
        total = None
        for batch in round_batches:
            grads = torch.autograd.grad(loss_of(self.model, batch), list(self.named.values()))
            total = list(grads) if total is None else [t + g for t, g in zip(total, grads)]
        return total

    def step(self, round_batches) -> float:
        for p, g in zip(self.named.values(), self.gradient(round_batches)):
            p.grad = g
        norm = float(torch.nn.utils.clip_grad_norm_(list(self.named.values()), self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def sync_armed(engine) -> bool:
    """What the wrapper will do at the next backward: reduce across ranks (and, DeepSpeed, step) or accumulate."""
    if isinstance(engine, DDPEngine):
        return engine.ddp.require_backward_grad_sync
    return engine.ds.is_gradient_accumulation_boundary()


def accumulated_gradient(engine) -> list[torch.Tensor]:
    """The round's gradient as the wrapper holds it for the step (DeepSpeed: in its own buffers at stages 1-3)."""
    trainable = [p for p in engine.model.parameters() if p.requires_grad]
    if isinstance(engine, DeepSpeedEngine):
        from deepspeed.utils import safe_get_full_grad

        return [safe_get_full_grad(p).view(getattr(p, "ds_shape", p.shape)) for p in trainable]
    return [p.grad for p in trainable]


def run_round(engine, round_batches) -> None:
    """The round's backward calls through the engine's forward, the sync armed for the last one only."""
    n = len(round_batches)
    for k, batch in enumerate(round_batches):
        assert sync_armed(engine) == (k == n - 1), f"sync armed {sync_armed(engine)} before backward {k + 1} of {n}"
        engine.backward(loss_of(engine.forward_model, batch))
    assert sync_armed(engine), "the boundary must hold through step()"


def assert_state_is_the_references(engine, ref: Reference) -> None:
    weights = engine.trainable_state()
    assert list(weights) == list(ref.named)
    for name, p in ref.named.items():
        torch.testing.assert_close(weights[name], p.detach(), **STATE, msg=lambda m, n=name: f"{n}: {m}")
    ours, theirs = engine.state_dict(), ref.optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for i, per_tensor in theirs["state"].items():
        assert ours["state"][i].keys() == per_tensor.keys()
        for key, value in per_tensor.items():
            torch.testing.assert_close(ours["state"][i][key], value, **STATE, msg=lambda m, i=i, k=key: f"{i}/{k}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_a_round_syncs_once_and_steps_on_the_sum_of_its_backward_calls(group, kind):
    cfg = load_config(CONFIG, KINDS[kind] + ["sampling.num_steps=2"])
    n = backwards_per_round(cfg)
    assert n == 3
    model = student()
    ref = Reference(model, cfg)
    engine = make_engine(cfg, model, group)
    assert isinstance(engine, Engine)
    ema = EMA(engine.params, EMAConfig(), engine)
    # the EMA asks the engine whether its tensors are shards; gathered, they are the full initial weights
    assert engine.params_are_shards == (kind == "zero3")
    for (name, p), full in zip(ref.named.items(), ema.state_dict().values()):
        torch.testing.assert_close(full, p.detach(), rtol=0, atol=0, msg=lambda m, n=name: f"EMA {n}: {m}")
    if engine.params_are_shards:
        with pytest.raises(NotImplementedError, match="sharded parameters"), ema.swapped_in():
            pass

    # round 1, with a step() one backward early
    rounds = [batches(seed, n) for seed in range(6)]
    for batch in rounds[0][:-1]:
        assert not sync_armed(engine)
        engine.backward(loss_of(engine.forward_model, batch))
    with pytest.raises(RuntimeError, match=rf"step\(\) after {n - 1} backward calls; the engine was built for {n}"):
        engine.step()
    assert sync_armed(engine)
    engine.backward(loss_of(engine.forward_model, rounds[0][-1]))
    assert sync_armed(engine)
    for ours, theirs in zip(accumulated_gradient(engine), ref.gradient(rounds[0])):
        torch.testing.assert_close(ours, theirs, **GRAD)
    assert engine.step() == pytest.approx(ref.step(rounds[0]), rel=GRAD["rtol"])
    assert not sync_armed(engine)
    assert_state_is_the_references(engine, ref)

    # round 2: a whole round dropped by zero_grad() first (the trainer's round with a non-finite loss); a new rate
    run_round(engine, rounds[1])
    engine.zero_grad()
    assert not sync_armed(engine)
    engine.lr = 1e-3
    for group_ in ref.optimizer.param_groups:
        group_["lr"] = 1e-3
    run_round(engine, rounds[2])
    assert engine.step() == pytest.approx(ref.step(rounds[2]), rel=GRAD["rtol"])
    assert engine.lr == 1e-3
    assert_state_is_the_references(engine, ref)

    # round 3 from a loaded state: weights and Adam's moments that no step produced
    g = torch.Generator().manual_seed(7)
    weights = {name: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for name, p in ref.named.items()}
    optimizer = ref.optimizer.state_dict()
    for per_tensor in optimizer["state"].values():
        per_tensor["exp_avg"] = 0.01 * torch.randn(per_tensor["exp_avg"].shape, generator=g)
        per_tensor["exp_avg_sq"] = 0.001 * torch.rand(per_tensor["exp_avg_sq"].shape, generator=g)
        per_tensor["step"] = torch.tensor(5.0)
    engine.load_trainable_state(weights)
    engine.load_state_dict(copy.deepcopy(optimizer))
    with torch.no_grad():
        for name, p in ref.named.items():
            p.copy_(weights[name])
    ref.optimizer.load_state_dict(optimizer)
    assert_state_is_the_references(engine, ref)
    run_round(engine, rounds[3])
    assert engine.step() == pytest.approx(ref.step(rounds[3]), rel=GRAD["rtol"])
    assert_state_is_the_references(engine, ref)

    # round 4: one backward past the round's last, through the wrapper's forward; zero_grad() starts a new round
    run_round(engine, rounds[4])
    with pytest.raises(RuntimeError, match=rf"backward call {n + 1} in one round; the engine was built for {n}"):
        engine.backward(loss_of(engine.forward_model, rounds[4][0]))
    with pytest.raises(RuntimeError, match=rf"step\(\) after {n + 1} backward calls"):
        engine.step()
    engine.zero_grad()
    assert engine.backwards_done == 0
    run_round(engine, rounds[5])
    assert engine.step() == pytest.approx(ref.step(rounds[5]), rel=GRAD["rtol"])
    assert_state_is_the_references(engine, ref)


@pytest.mark.parametrize(
    "dropped, overrides", [(1, []), (3, ["engine.bf16=true"])], ids=["fp32_partial_round", "bf16_whole_round"]
)
def test_zero2_zero_grad_drops_the_gradient(group, dropped, overrides):
    cfg = load_config(CONFIG, KINDS["zero2"] + overrides + ["sampling.num_steps=2"])
    model = student()
    ref = Reference(model, cfg)
    engine = make_engine(cfg, model, group)
    rounds = [batches(seed, backwards_per_round(cfg)) for seed in range(2)]
    for batch in rounds[0][:dropped]:
        engine.backward(loss_of(engine.forward_model, batch))
    engine.zero_grad()
    run_round(engine, rounds[1])
    # bf16 weights and activations: the norm to 2% of the fp32 reference's (a leaked round adds ~100%)
    assert engine.step() == pytest.approx(ref.step(rounds[1]), rel=0.02 if cfg.engine.bf16 else GRAD["rtol"])
