"""model.attention (opd_fast.attention): the hooks route each attention call of SD3 and FLUX, the flash-attn routing
keeps the model's output and gradient (on CPU through a reference kernel in flash_attn_func's layout), cuDNN and
flash-attn against torch's SDPA on a GPU, and a backend that cannot run is a config error before any model loads."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import every_family

from opd_fast import attention
from opd_fast.config import ConfigError, ModelConfig
from opd_fast.families import get_family
from opd_fast.models import Conditioning, load_transformer

SD3 = get_family("sd3")


def sdpa_bshd(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func's signature and (B, S, H, D) layout, computed by torch's SDPA: the reference kernel."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=dropout_p,
        is_causal=causal,
        scale=softmax_scale,
    )
    return out.transpose(1, 2)


def tiny(family, dtype=torch.bfloat16, device="cpu"):
    model = load_transformer(ModelConfig(family=family.name, preset=family.tiny_preset), family)
    return torch.nn.Module.to(model, device=device, dtype=dtype)


def forward_and_grad(model, family, device="cpu"):
    """The velocity (CFG for SD3) at a fixed input, and the gradient of a fixed projection of it w.r.t. the input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(family.latent_shape(model, 2, 64), generator=g).to(device).requires_grad_(True)
    cond = family.random_conditioning(model, 2, 16, g)
    cond = Conditioning(
        *(t.to(device) for t in (cond.prompt_embeds, cond.pooled, cond.negative_embeds, cond.negative_pooled))
    )
    v, _ = family.velocity(model, x, torch.tensor([0.8, 0.3], device=device), cond, 4.5)
    weights = torch.randn(v.shape, generator=g).to(device)
    (v.float() * weights).sum().backward()
    return v.detach().float(), x.grad.float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@every_family
def test_flash_routing_keeps_output_and_gradient(family):
    model = tiny(family)
    ref_v, ref_grad = forward_and_grad(model, family)
    hooked = attention.use_backend(model, "flash", flash_kernel=sdpa_bshd)
    # every attention module: tiny-sd3, 2 joint blocks; tiny-flux, 1 double + 1 single block; tiny-wan, self and
    # cross attention in 2 blocks; tiny-z-image, its refiners' and main layers'
    assert hooked == len(attention._attention_modules(model)) > 0
    v, grad = forward_and_grad(model, family)
    # every attention call went through the kernel, once per forward; a call with a padding mask (Qwen-Image's
    # negative prompt, Z-Image's padded captions) is left to SDPA, which flash-attn's dense kernel cannot replace
    assert model._opd_flash.calls == hooked or (family.text_widths(model)[1] == 0 and model._opd_flash.calls < hooked)
    # the same math in another layout: bf16 rounding apart; a layout error (heads <-> tokens) is O(1)
    assert rel(v, ref_v) < 1e-2 and rel(grad, ref_grad) < 2e-2


def test_flash_routing_covers_the_gradient_checkpointing_recompute():
    model = tiny(SD3)
    ref_v, ref_grad = forward_and_grad(model, SD3)
    model.enable_gradient_checkpointing()
    attention.use_backend(model, "flash", flash_kernel=sdpa_bshd)
    v, grad = forward_and_grad(model, SD3)
    assert model._opd_flash.calls == 4  # 2 blocks in the forward, the same 2 again in the backward's recompute
    assert rel(v, ref_v) < 1e-2 and rel(grad, ref_grad) < 2e-2


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_torch_compile_traces_the_routed_attention_in_one_graph(backend):
    # bench_round's compile row compiles every block with the backend set: a graph break per attention call would
    # cost what compiling buys. fullgraph=True fails on any break.
    model = tiny(SD3, torch.bfloat16)
    attention.use_backend(model, backend, flash_kernel=sdpa_bshd if backend == "flash" else None)
    attn = model.transformer_blocks[0].attn
    hidden, context = torch.randn(2, 16, 32, dtype=torch.bfloat16), torch.randn(2, 16, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = attn(hidden, encoder_hidden_states=context)
        out = torch.compile(attn, fullgraph=True)(hidden, encoder_hidden_states=context)
    for a, b in zip(out, ref):
        assert rel(a.float(), b.float()) < 1e-2


def test_flash_routing_leaves_other_calls_to_torch():
    mode = attention.FlashSDPA(kernel=sdpa_bshd, cuda_only=False)
    q = torch.randn(2, 3, 5, 8)
    with mode:
        F.scaled_dot_product_attention(q, q, q)  # float32: flash-attn takes fp16/bf16 only
        F.scaled_dot_product_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), attn_mask=torch.ones(5, 5).bool())
        F.scaled_dot_product_attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    assert mode.calls == 1
    assert not attention.FlashSDPA(kernel=sdpa_bshd).qualifies(q.bfloat16(), q, q)  # CPU tensors: not by default


def test_cudnn_backend_hooks_every_model_of_the_trainer(tiny_trainer):
    trainer = tiny_trainer(**{"model.attention": "cudnn"})
    models = [trainer.student] + [t.model for t in trainer.teachers.values()]
    assert all(m._opd_attention == "cudnn" for m in models)
    copied = copy.deepcopy(trainer.student).transformer_blocks[0].attn
    assert copied.forward.__self__ is copied and copied._opd_attention == "cudnn"  # runs the copy's weights
    # on a CPU the priority list falls through to torch's CPU kernels: same result as plain SDPA
    model = tiny(SD3, torch.float32)
    ref_v, ref_grad = forward_and_grad(model, SD3)
    attention.use_backend(model, "cudnn")
    v, grad = forward_and_grad(model, SD3)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_an_attention_backend_that_cannot_run_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="model.attention"):
        tiny_config(**{"model.attention": "xformers"})
    if attention.flash_available()[0]:
        pytest.skip("flash-attn imports here")
    with pytest.raises(ConfigError, match="model.attention flash: .*use sdpa or cudnn"):
        attention.check("flash")


FLASH = attention.flash_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "backend",
    ["cudnn", pytest.param("flash", marks=pytest.mark.skipif(not FLASH[0], reason=f"flash-attn: {FLASH[1]}"))],
)
@every_family
def test_attention_backend_on_cuda_matches_sdpa(backend, family):
    model = tiny(family, device="cuda")
    ref_v, ref_grad = forward_and_grad(model, family, "cuda")
    attention.use_backend(model, backend)
    v, grad = forward_and_grad(model, family, "cuda")
    if backend == "flash":
        assert model._opd_flash.calls == 2
    assert rel(v, ref_v) < 1e-2 and rel(grad, ref_grad) < 2e-2
