"""The `demo` subcommand; opd_fast.cli registers it with add_subcommand(subparsers)."""

from __future__ import annotations

import argparse


def _demo(args) -> int:
    from opd_fast.demo.run import run_demo

    run_demo(args.out, quick=args.quick, force=args.force, cache=args.cache, workers=args.workers, only=args.only)
    return 0


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    from opd_fast.demo.run import default_cache

    demo = subparsers.add_parser(
        "demo",
        help="the paper's comparison in miniature on a CPU: pretrain, teachers, OPD student, baselines",
        description="Pretrain a tiny SD3-architecture base, train one teacher per task (composition, glyph, "
        "aesthetic), distill them into one student with on-policy distillation (the trainer of "
        "`opd-fast train`, on the built-in configs/demo.yaml), run the baselines on the same budget, and write "
        "OUT/results.md, results.json, samples.png, curves.png, gradient_variance.png. Every stage is "
        "cached, so a second run only writes the report.",
    )
    demo.add_argument("--out", required=True, help="folder for the report (results.md, results.json, PNGs)")
    demo.add_argument("--quick", action="store_true", help="a reduced run (the CI's): smaller budgets, same stages")
    demo.add_argument("--force", action="store_true", help="recompute every stage even if it is cached")
    demo.add_argument("--cache", default=None, help=f"stage cache folder (default: {default_cache()})")
    demo.add_argument(
        "--workers",
        type=int,
        default=None,
        help="stages run in parallel (default: min(2, CPU count); 1 runs in this process)",
    )
    demo.add_argument(
        "--only",
        default=None,
        metavar="STAGE",
        help="run only STAGE and the stages it needs, then stop without a report (e.g. prompts, base, "
        "teacher/glyph, opd-ode, eval/opd-ode; an unknown name lists them all)",
    )
    demo.set_defaults(func=_demo)
    return demo
