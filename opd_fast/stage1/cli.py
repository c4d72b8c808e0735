"""`opd-fast teach` (stage 1: one task's teacher by Flow-GRPO or DiffusionNFT) and `opd-fast pipeline` (stage 1 for
every teacher that does not exist yet, then stage 2 with them: opd_fast.stage1.pipeline), registered on the main
parser by add_subcommands."""

from __future__ import annotations

from pathlib import Path


def _common(parser, what: str) -> None:
    parser.add_argument("config", help=f"YAML {what} config")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _teach(args) -> int:
    from opd_fast.stage1.config import load_teach_config
    from opd_fast.stage1.trainer import TeachTrainer

    cfg = load_teach_config(args.config, args.set)
    trainer = TeachTrainer.build(cfg, args.out, resume=args.resume, device=args.device)
    try:
        records = trainer.fit()
    finally:
        trainer.close()
    from opd_fast import distributed

    distributed.shutdown()
    if trainer.dist.is_main:
        from opd_fast.stage1.pipeline import final_export

        done = (
            f"rounds {records[0]['step']}..{records[-1]['step']}"
            if records
            else f"nothing to train (round {trainer.round})"
        )
        print(
            f"teacher {cfg.task.name} ({cfg.method}): {done}; reward {trainer.stats.get('reward', float('nan')):.4g}; "
            f"teacher: {final_export(cfg, Path(args.out))[0]}"
        )
    return 0


def _pipeline(args) -> int:
    from opd_fast import distributed
    from opd_fast.stage1.pipeline import final_export, load_pipeline, run_pipeline

    pipeline = load_pipeline(args.config, args.out, args.set)
    done = run_pipeline(pipeline, resume=args.resume, until=args.until, device=args.device)
    distributed.shutdown()
    if distributed.launcher_env()[0] == 0:  # one summary per run
        for folder, what in done.items():
            print(f"{folder}: {what}")
        if args.until == "opd":
            print(f"student: {final_export(pipeline.opd, pipeline.opd_dir)[0]}")
        else:
            print(f"teachers ready; `--resume` without --until runs stage 2 into {pipeline.opd_dir}")
    return 0


def add_subcommands(sub) -> None:
    teach = sub.add_parser("teach", help="stage 1: train one task's teacher (Flow-GRPO or DiffusionNFT) on its reward")
    _common(teach, "teach")
    teach.add_argument("--out", required=True, help="output folder: checkpoints, metrics.jsonl, lora_diffusers/")
    teach.set_defaults(func=_teach)
    pipeline = sub.add_parser(
        "pipeline", help="stage 1 for every task whose teacher does not exist yet, then stage 2 with them"
    )
    _common(pipeline, "run (stage 2) config whose tasks may carry a `teach:` section")
    pipeline.add_argument("--out", required=True, help="output folder: teachers/<task>/ (stage 1) and opd/ (stage 2)")
    pipeline.add_argument(
        "--until", choices=("teachers", "opd"), default="opd", help="stop after this stage (default: all of them)"
    )
    pipeline.set_defaults(func=_pipeline)
