"""opd-fast: multi-task on-policy distillation of diffusion students (DiffusionOPD). Commands: train (a run from a
YAML config; without one, the built-in tiny CPU run), teach and pipeline (stage 1: a task's teacher by Flow-GRPO or
DiffusionNFT; both stages from one config), demo (the paper's comparison in miniature on a CPU), tiny-world (write
the tiny run's world), sample and eval (a student's images and their rewards), report (a paper-style table of a
run's evaluations), reward-server (a reward served over HTTP)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from opd_fast import __version__


def _train(args) -> int:
    from opd_fast.config import load_config
    from opd_fast.resources import TINY_CONFIG, builtin_path
    from opd_fast.trainer import Trainer

    cfg = load_config(args.config or builtin_path(TINY_CONFIG), args.set)
    hooks = []
    if args.profile_steps is not None:
        from opd_fast.profiling import CaptureWindow

        hooks.append(CaptureWindow(*args.profile_steps))
    if cfg.eval.enabled:  # the eval section: evaluations while it trains (opd_fast.evaluate.during)
        from opd_fast.evaluate.during import EvalHook

        hooks.append(EvalHook())
    trainer = Trainer.build(cfg, args.out, resume=args.resume, device=args.device, hooks=hooks)
    try:
        records = trainer.fit()
    finally:
        trainer.close()
    from opd_fast import distributed

    distributed.shutdown()
    if not trainer.dist.is_main:  # one summary per run
        return 0
    if records:
        first, last = records[0]["loss"], records[-1]["loss"]
        print(
            f"trained rounds {records[0]['step']}..{records[-1]['step']}: loss {first:.4g} -> {last:.4g}; "
            f"student LoRA: {Path(args.out) / 'lora_diffusers'}"
        )
    else:
        print(f"nothing to train: {args.out} is already at round {trainer.round} of {cfg.train.rounds}")
    return 0


def _tiny_world(args) -> int:
    from opd_fast.tiny_world import write_tiny_world

    print(f"wrote the tiny world to {write_tiny_world(args.out)}")
    return 0


def _profile_window(spec: str) -> tuple[int, int]:
    from opd_fast.profiling import parse_window

    try:
        return parse_window(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank=N before the verb; torchrun exports LOCAL_RANK only.
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher (the same as the LOCAL_RANK it exports)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="multi-task on-policy distillation of a student from task teachers")
    train.add_argument(
        "config", nargs="?", help="YAML run config (default: the built-in tiny CPU run, configs/tiny.yaml)"
    )
    train.add_argument("--out", required=True, help="output folder: checkpoints, metrics.jsonl, lora_diffusers/")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.rounds=4 (repeatable)",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train.add_argument(
        "--profile-steps",
        type=_profile_window,
        default=None,
        metavar="A:B",
        help="cudaProfilerStart/Stop around rounds A..B-1 (0-based), for nsys profile "
        "--capture-range=cudaProfilerApi; a no-op without CUDA",
    )
    train.set_defaults(func=_train)

    tiny = sub.add_parser("tiny-world", help="write the tiny default's prompt sets and seeded teachers")
    tiny.add_argument("out", help="folder to write (configs/tiny holds the copy configs/tiny.yaml uses)")
    tiny.set_defaults(func=_tiny_world)

    from opd_fast.evaluate.cli import add_subcommands as add_sample_and_eval

    add_sample_and_eval(sub)
    from opd_fast.evaluate.report import add_subcommand as add_report

    add_report(sub)
    from opd_fast.demo.cli import add_subcommand as add_demo

    add_demo(sub)
    from opd_fast.stage1.cli import add_subcommands as add_teach

    add_teach(sub)
    return parser


# OSErrors that are the machine's state, not a bug: one line each (the data written before them is intact).
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOTDIR}


def _input_error(message: str, many_ranks: bool) -> int:
    """Bad input or a machine that cannot take the run: one line, exit status 2."""
    from opd_fast import distributed

    rank = f"rank {os.environ.get('RANK', '0')}: " if many_ranks else ""
    print(f"opd-fast: error: {rank}{message}", file=sys.stderr, flush=True)
    if many_ranks:  # the other ranks may be waiting on this one: leave without the group's teardown
        distributed.exit_now(2)
    return 2


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import that its image processors want torchvision, which no opd-fast path uses
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from opd_fast import distributed
    from opd_fast.checkpoint import CheckpointError
    from opd_fast.config import ConfigError
    from opd_fast.evaluate.base import RewardError
    from opd_fast.prompts import PromptError
    from opd_fast.run_folder import OutputDirError
    from opd_fast.safeio import UnsafeFileError
    from opd_fast.teachers import TeacherError
    from opd_fast.trainer import TrainingError

    try:
        os.environ.update(
            distributed.slurm_launch_env()
        )  # ranks srun started itself: torchrun's variables, from srun's
    except ConfigError as e:
        print(f"opd-fast: error: {e}", file=sys.stderr)
        return 2
    local_rank = None if args.local_rank is None else str(args.local_rank)
    if local_rank is not None and os.environ.setdefault("LOCAL_RANK", local_rank) != local_rank:
        print(f"opd-fast: error: --local_rank={local_rank} but LOCAL_RANK={os.environ['LOCAL_RANK']}", file=sys.stderr)
        return 2
    many_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        code = args.func(args)
    except (
        ConfigError,
        PromptError,
        TeacherError,
        OutputDirError,
        TrainingError,
        UnsafeFileError,
        CheckpointError,
        RewardError,
        FileNotFoundError,
    ) as e:
        return _input_error(str(e), many_ranks)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            if many_ranks:
                distributed.fail(e)
            raise
        # a full disk, a read-only or unwritable folder: what failed and where, not a traceback
        return _input_error(f"{e.strerror} ({e.filename}); nothing written before it was lost", many_ranks)
    except Exception as e:
        if many_ranks:
            distributed.fail(e)  # one clear line, and an exit that cannot block on a dead peer
        raise
    if many_ranks:  # leave without the interpreter's teardown, which can abort a finished run (distributed.finish)
        distributed.finish(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
