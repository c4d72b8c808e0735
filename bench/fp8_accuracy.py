"""Teacher-velocity error of FP8 teachers against bf16 and fp32 ones, and per layer type.

    python bench/fp8_accuracy.py                               # tiny-sd3 on CPU (seconds)
    python bench/fp8_accuracy.py --per-layer                   # + which layer types FP8 hurts (opd_fast.fp8 doc)
    python bench/fp8_accuracy.py --preset sd3.5-medium --device cuda --resolution 512
    python bench/fp8_accuracy.py --preset flux.1-dev --device cuda --resolution 512
    python bench/fp8_accuracy.py --preset wan2.1-t2v-1.3b --layers 2 --resolution 64    # any family's preset

Random weights (the presets' released architectures), random text embeddings, states x_sigma = (1 - sigma) x0 +
sigma eps at 5 sigmas of the 10-step grid. The error is ||v - v_ref|| / ||v_ref|| of the velocity opd_step consumes
(CFG applied for SD3, guidance embedding for FLUX), over all samples and sigmas. Prints a table and, with --json,
writes the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch
from common import build_random_transformer

from opd_fast import fp8
from opd_fast.families import PRESETS, Family
from opd_fast.models import Conditioning
from opd_fast.ops.opd_step.naive import apply_cfg
from opd_fast.schedule import sigma_grid

LAYER_TYPES = {  # name pattern (regex on the module name) -> layer type, first match wins; every family's names
    # SD3 / FLUX / Qwen-Image (norm*.linear, img_mod / txt_mod), Wan (scale-shift tables are parameters, not linears),
    # Z-Image (adaLN_modulation)
    r"(^|\.)norm[^.]*\.linear$|\.(img_mod|txt_mod)\.|adaLN_modulation": "adaLN modulation",
    r"^(time_text_embed|condition_embedder|t_embedder|cap_embedder)\.": "time/text embedders",
    r"^(context_embedder|x_embedder|img_in|txt_in|all_x_embedder\..*)$": "input embedders",
    r"^(proj_out|all_final_layer\..*\.linear)$": "final projection",
    r"\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)$": "attention q/k/v",
    r"\.(to_out\.0|to_add_out)$": "attention out",
    r"\.(ff|ff_context|ffn|img_mlp|txt_mlp|feed_forward)\.|\.proj_mlp$|^single_transformer_blocks\.\d+\.proj_out$": "MLP",
}


def layer_type(name: str) -> str | None:
    return next((kind for pattern, kind in LAYER_TYPES.items() if re.search(pattern, name)), None)


def make_inputs(model, family: Family, batch: int, resolution: int, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = family.latent_shape(model, batch, resolution)
    dim = family.text_widths(model)[0]
    tokens = family.text_tokens() if dim >= 1024 else 16  # the released encoders'; the tiny presets: the builtin 16
    cond = family.random_conditioning(model, batch, tokens, g)
    cond = Conditioning(
        *(t.to(device) for t in (cond.prompt_embeds, cond.pooled, cond.negative_embeds, cond.negative_pooled))
    )
    sigmas = sigma_grid(family, 10, image_seq_len=family.image_tokens(model, resolution))  # the released configs
    states = []
    for j in (0, 2, 4, 6, 8):
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        sigma = sigmas[j].expand(batch)
        x = (1 - sigma.view(-1, *[1] * (len(shape) - 1))) * x0 + sigma.view(-1, *[1] * (len(shape) - 1)) * eps
        states.append((x.to(device), sigma.to(device)))
    return cond, states


@torch.no_grad()
def velocities(model, family: Family, cond, states, guidance: float) -> torch.Tensor:
    outs = []
    with fp8.forward_context(model):
        for x, sigma in states:
            v, g = family.velocity(model, x, sigma, cond, guidance)
            outs.append(apply_cfg(v, g).float())
    return torch.stack(outs)


def rel_err(v: torch.Tensor, ref: torch.Tensor) -> float:
    return float((v - ref).norm() / ref.norm())


def fp8_copy(model, backend: str, scaling: str, skip=None):
    clone = copy.deepcopy(model)
    fp8.quantize_model(clone, backend=backend, scaling=scaling, skip=skip)
    return clone


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-sd3", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 for tiny presets, else 512)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--per-layer", action="store_true", help="FP8 on one layer type at a time (vs fp32)")
    ap.add_argument("--layers", type=int, default=None, help="keep only this many blocks (widths unchanged)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    family = PRESETS[args.preset]
    keep = fp8.DEFAULT_SKIP + family.fp8_keep  # what a teacher of this family keeps high (teachers.apply_precision)
    resolution = args.resolution or (64 if args.preset.startswith("tiny") else 512)
    t0 = time.perf_counter()

    model32 = build_random_transformer(args.preset, args.device, torch.float32, layers=args.layers)
    cond, states = make_inputs(model32, family, args.batch, resolution, args.device)
    ref32 = velocities(model32, family, cond, states, args.guidance)
    rows: dict[str, dict[str, float]] = {}
    per_layer: dict[str, dict[str, float]] = {}
    if args.per_layer:
        names = [n for n, m in model32.named_modules() if isinstance(m, torch.nn.Linear)]
        kinds = sorted({layer_type(n) for n in names} - {None})
        unclassified = [n for n in names if layer_type(n) is None]
        if unclassified:
            print(f"note: {len(unclassified)} linears of no listed type, e.g. {unclassified[:3]}")
        for kind in kinds + ["all"]:
            # every linear of this type but those the family must keep high (Family.fp8_keep: the model reads
            # their weights directly, which FP8 breaks); fp8.DEFAULT_SKIP's are measured, it is what they justify
            members = {n for n in names if kind in ("all", layer_type(n)) and not fp8.is_skipped(n, family.fp8_keep)}
            if not members:
                per_layer[kind] = {"kept": True}
                continue
            others = [n for n in names if n not in members]
            per_layer[kind] = {
                s: rel_err(
                    velocities(fp8_copy(model32, "torch", s, skip=others), family, cond, states, args.guidance), ref32
                )
                for s in ("rowwise", "tensorwise")
            }

    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    del model32
    ref16 = velocities(model16, family, cond, states, args.guidance)
    rows["bf16"] = {"vs_fp32": rel_err(ref16, ref32), "vs_bf16": 0.0}
    variants = [("torch", "rowwise"), ("torch", "tensorwise")]
    te_ok, te_why = fp8.te_available()
    if te_ok and args.device.startswith("cuda"):
        variants += [("te", "tensorwise"), ("te", "rowwise")]
    for backend, scaling in variants:
        try:
            v = velocities(fp8_copy(model16, backend, scaling, keep), family, cond, states, args.guidance)
            rows[f"fp8 {backend} {scaling}"] = {"vs_fp32": rel_err(v, ref32), "vs_bf16": rel_err(v, ref16)}
        except Exception as e:  # noqa: BLE001  (report any failure, keep measuring the others)
            rows[f"fp8 {backend} {scaling}"] = {"error": f"{type(e).__name__}: {e}"}
    if args.device == "cpu":  # FP8 on a float32 base isolates the FP8 error from bf16's
        base = build_random_transformer(args.preset, "cpu", torch.float32, layers=args.layers)
        v = velocities(fp8_copy(base, "torch", "rowwise", keep), family, cond, states, args.guidance)
        rows["fp8 torch rowwise (fp32 base)"] = {"vs_fp32": rel_err(v, ref32)}

    blocks = f" ({args.layers} blocks)" if args.layers else ""
    print(
        f"\n{args.preset}{blocks} @ {resolution}px, batch {args.batch}, CFG {args.guidance}, {args.device}"
        f"{'' if te_ok else f' (TE: {te_why})'}; {time.perf_counter() - t0:.1f} s"
    )
    print(f"{'teacher':34s} {'rel err vs fp32':>16s} {'vs bf16':>10s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:34s} {r['error']}")
        else:
            vb = f"{r['vs_bf16']:10.4f}" if "vs_bf16" in r else f"{'':10s}"
            print(f"{name:34s} {r['vs_fp32']:16.4f} {vb}")
    if per_layer:
        print("\nFP8 on one layer type at a time (rel err vs fp32):")
        print(f"{'layer type':24s} {'rowwise':>9s} {'tensorwise':>11s}")
        for kind, r in per_layer.items():
            if r.get("kept"):
                print(f"{kind:24s} {'kept high by the family (Family.fp8_keep)':>21s}")
            else:
                print(f"{kind:24s} {r['rowwise']:9.4f} {r['tensorwise']:11.4f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "preset": args.preset,
                    "layers": args.layers,
                    "resolution": resolution,
                    "device": args.device,
                    "teachers": rows,
                    "per_layer": per_layer,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
