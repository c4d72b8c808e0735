"""The student's mixed precision: a bf16 base with fp32 LoRA weights runs its training forward under bf16 autocast,
with peft's input casting off, so the LoRA GEMMs run in bf16 (tensor cores on a GPU) and autograd keeps no fp32 copy of
their inputs; the weights and Adam stay fp32. Held against an fp32 computation (flash-attention's tolerance rule for
the forward, a cosine for the gradient) and against the old path (peft casting each LoRA input up to fp32) for the
bytes autograd saves."""

import copy

import pytest
import torch

from opd_fast.config import LoraConfig, ModelConfig
from opd_fast.families import get_family
from opd_fast.models import (
    Conditioning,
    add_student_lora,
    autocast_dtype,
    load_transformer,
    student_forward_context,
)
from opd_fast.trainer import Trainer

RANK = 8
SD3 = get_family("sd3")


def bf16_student() -> torch.nn.Module:
    """tiny-sd3 in bf16 with an fp32 LoRA whose B is nonzero (a trained student, so the LoRA path counts)."""
    model = load_transformer(ModelConfig(preset="tiny-sd3", dtype="bfloat16"), SD3)
    add_student_lora(model, LoraConfig(rank=RANK, alpha=2 * RANK))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = Conditioning(
        torch.randn(2, 16, 32, generator=g),
        torch.randn(2, 32, generator=g),
        torch.randn(1, 16, 32, generator=g),
        torch.randn(1, 32, generator=g),
    )
    return x, torch.tensor([0.8, 0.45]), cond


def lora_layers(model):
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def run(model, autocast: bool):
    """(velocity fp32, LoRA gradient flattened, activation bytes autograd saved: unique storages, parameters
    excluded) of one CFG forward at guidance 4.5, with or without the student's autocast."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    x, sigma, cond = inputs()
    context = student_forward_context(model, autocast_dtype(model) if autocast else None)
    with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v, _ = SD3.velocity(model, x, sigma, cond, 4.5)
    model.zero_grad(set_to_none=True)
    v.float().square().sum().backward()
    grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
    return v.detach().float(), grad, sum(saved.values())


def test_bf16_student_runs_its_forward_under_autocast_with_fp32_weights():
    student = bf16_student()
    assert autocast_dtype(student) == torch.bfloat16
    with student_forward_context(student, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and not any(m.cast_input_dtype_enabled for m in lora_layers(student))
    # outside the student's forward peft casts as it always does, so other callers' fp32 path still runs
    assert all(layer.cast_input_dtype_enabled for layer in lora_layers(student))
    assert {p.dtype for p in student.parameters() if p.requires_grad} == {torch.float32}
    assert autocast_dtype(load_transformer(ModelConfig(preset="tiny-sd3"), SD3)) is None  # fp32: nothing to mix
    full = load_transformer(ModelConfig(preset="tiny-sd3", dtype="bfloat16"), SD3)
    add_student_lora(full, LoraConfig(enabled=False))
    assert autocast_dtype(full) is None  # every weight trains: no frozen 16-bit base


def test_autocast_forward_and_gradient_against_fp32():
    """Forward: at most twice as far from the fp32 computation as the plain bf16 one (the student's LoRA in bf16
    too), plus a floor of 1e-3 of the output's scale. Gradient: cosine with the fp32 one > 0.999 (measured on this
    model: 0.99999, the same as the plain bf16 computation's)."""
    student = bf16_student()
    fp32 = copy.deepcopy(student).float()
    plain_bf16 = copy.deepcopy(student)
    for p in plain_bf16.parameters():
        p.data = p.data.bfloat16()
    assert autocast_dtype(plain_bf16) is None
    ref, grad_ref, _ = run(fp32, autocast=False)
    out, grad, _ = run(student, autocast=True)
    out_pt, _, _ = run(plain_bf16, autocast=False)
    assert (out - ref).abs().max() <= 2 * (out_pt - ref).abs().max() + 1e-3 * ref.abs().max()
    cosine = torch.nn.functional.cosine_similarity(grad.double(), grad_ref.double(), dim=0)
    assert cosine > 0.999, cosine


def test_autocast_saves_no_fp32_copy_of_the_lora_inputs():
    """Predicted from the LoRA layers' shapes. The old path (peft casting each input up) saves per LoRA layer an
    fp32 copy of its input (4 in tokens bytes) and fp32 rank-r activations (4 r tokens); autocast saves each distinct
    input once in bf16 (2 in tokens: q/k/v share theirs) and bf16 rank-r activations (2 r tokens), plus up to the
    bf16 copies of the LoRA factors autocast makes (2 r (in + out)). The measured drop lies in that band."""
    student = bf16_student()
    layers = []
    hooks = [
        layer.register_forward_hook(lambda m, args, out: layers.append((m, args[0]))) for layer in lora_layers(student)
    ]
    with student_forward_context(student, torch.bfloat16):  # the inputs as the autocast forward sees them
        SD3.velocity(student, *inputs(), 4.5)
    for hook in hooks:
        hook.remove()
    tokens = {id(m): x.shape[:-1].numel() for m, x in layers}
    old = sum(4 * (m.in_features + RANK) * tokens[id(m)] for m, _ in layers)
    # bf16 inputs, each storage once (q/k/v read one tensor; an attention output may be split into two views)
    distinct = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for _, x in layers}
    new_low = sum(distinct.values()) + sum(2 * RANK * tokens[id(m)] for m, _ in layers)
    new_high = new_low + sum(2 * RANK * (m.in_features + m.out_features) for m, _ in layers)
    assert len(distinct) < len(layers)  # shared inputs are saved once

    _, _, saved_old = run(student, autocast=False)  # the old path: peft casts the bf16 input to the fp32 weights
    _, _, saved_new = run(student, autocast=True)
    assert old - new_high <= saved_old - saved_new <= old - new_low, (
        saved_old - saved_new,
        old - new_high,
        old - new_low,
    )


def test_trainer_trains_a_bf16_base_with_fp32_lora_and_adam(tiny_config, tmp_path):
    trainer = Trainer.build(tiny_config(**{"model.dtype": "bfloat16"}), tmp_path / "run", device="cpu")
    assert trainer.student_autocast == torch.bfloat16
    records = trainer.fit()
    assert all(r["grad_norm"] is not None and r["loss"] > 0 for r in records)
    state = trainer.engine.optimizer.state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert {p.dtype for p in trainer.engine.params} == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_on_cuda_against_fp32():
    """The same rule on the GPU, where autocast also runs layer norms and softmax in fp32."""
    student = bf16_student().cuda()
    fp32 = copy.deepcopy(student).float()
    plain_bf16 = copy.deepcopy(student)
    for p in plain_bf16.parameters():
        p.data = p.data.bfloat16()

    def on_cuda(model, autocast):
        x, sigma, cond = inputs()
        cond = Conditioning(*(t.cuda() for t in vars(cond).values()))
        with student_forward_context(model, autocast_dtype(model) if autocast else None):
            v, _ = SD3.velocity(model, x.cuda(), sigma.cuda(), cond, 4.5)
        return v.float()

    ref, out, out_pt = on_cuda(fp32, False), on_cuda(student, True), on_cuda(plain_bf16, False)
    assert (out - ref).abs().max() <= 2 * (out_pt - ref).abs().max() + 1e-3 * ref.abs().max()
