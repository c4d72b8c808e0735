"""`opd-fast sample`, `opd-fast eval` and `opd-fast reward-server`: add_subcommands(subparsers) registers them on the
main parser."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _config(args):
    """The run config: the YAML file if given, else the run folder's run.json; --set applies to either."""
    from opd_fast.config import ConfigError, apply_override, config_from_dict, load_config

    if args.config:
        return load_config(args.config, args.set)
    if args.run is None:
        raise ConfigError("sample: give a config file or --run (a run folder, whose run.json holds the config)")
    run_file = Path(args.run) / "run.json"
    if not run_file.is_file():
        raise ConfigError(f"--run {args.run}: no run.json (not an opd-fast run folder)")
    data = json.loads(run_file.read_text())["config"]
    for assignment in args.set:
        apply_override(data, assignment)
    return config_from_dict(data)  # run.json paths are already absolute


def _sample(args) -> int:
    from opd_fast.config import ConfigError
    from opd_fast.datasets import KINDS, read_dataset
    from opd_fast.evaluate.sample import SampleSettings, sample

    cfg = _config(args)
    if (args.task is None) == (args.prompts is None):
        raise ConfigError("sample: give exactly one of --task (a task's prompt set from the config) or --prompts FILE")
    if args.task is not None:
        task = next((t for t in cfg.tasks if t.name == args.task), None)
        if task is None:
            raise ConfigError(f"--task {args.task}: no such task (tasks: {', '.join(t.name for t in cfg.tasks)})")
        prompt_file, task_name = task.prompts, task.name
    else:
        prompt_file, task_name = args.prompts, Path(args.prompts).stem
    kind = args.kind or (task_name if task_name in KINDS else "auto")  # ocr/geneval sets get their checks
    prompt_set = read_dataset(prompt_file, kind, task_name)
    if args.limit is not None:
        prompt_set.prompts, prompt_set.metadata = prompt_set.prompts[: args.limit], prompt_set.metadata[: args.limit]
    settings = SampleSettings(
        model=args.model,
        task=task_name,
        num_steps=args.num_steps,
        guidance=args.guidance,
        resolution=args.resolution,
        seed=args.seed,
        batch_size=args.batch_size,
        grid_max=args.grid_max,
    )
    out = sample(cfg, prompt_set, args.out, settings, run_dir=args.run, device=args.device)
    print(f"wrote {len(prompt_set)} images of {args.model} ({task_name}) to {out} (grid: {out / 'grid.png'})")
    return 0


def _eval(args) -> int:
    from opd_fast.evaluate.eval import evaluate_folders, load_reward_spec
    from opd_fast.evaluate.registry import REWARDS

    if args.list:
        for name, cls in sorted(REWARDS.items()):
            reason = cls.unavailable()
            print(f"{name:12s} {'available' if reason is None else 'unavailable: ' + reason}")
        return 0
    if not args.samples or args.rewards is None or args.out is None:
        print("opd-fast eval: error: give sample folders, --rewards and --out (or --list)", file=sys.stderr)
        return 2
    report = evaluate_folders(args.samples, load_reward_spec(args.rewards), args.out, args.device, args.batch_size)
    print((Path(args.out) / "results.md").read_text(), end="")
    print(f"results: {Path(args.out) / 'results.json'} ({len(report['results'])} models)")
    return 0


def _reward_server(args) -> int:
    from opd_fast.evaluate.server import parse_options, serve

    serve(args.reward, parse_options(args.option), args.host, args.port, args.token, args.max_request_mb)
    return 0


def _reporting_reward_errors(func):
    """RewardError is this package's own error: report it like the main CLI reports config errors."""

    def run(args) -> int:
        from opd_fast.evaluate.base import RewardError

        try:
            return func(args)
        except RewardError as e:
            print(f"opd-fast: error: {e}", file=sys.stderr)
            return 2

    return run


def add_subcommands(subparsers) -> None:
    sample = subparsers.add_parser(
        "sample",
        help="images for a prompt set from the student, its EMA, the base or a teacher, through the diffusers pipeline",
    )
    sample.add_argument("config", nargs="?", help="YAML run config (default: the --run folder's run.json)")
    sample.add_argument("--run", help="run folder: its run.json and exported student (lora_diffusers[_ema])")
    sample.add_argument("--model", default="student", help="student | ema | base | teacher:TASK (default: student)")
    sample.add_argument("--task", help="sample the prompt set of this config task")
    sample.add_argument("--prompts", help="or a prompt file (.txt, .jsonl, DrawBench .csv)")
    sample.add_argument(
        "--kind",
        default=None,
        help="prompt set kind: txt, jsonl, pickscore, ocr, geneval, drawbench "
        "(default: the task name if it is one, else by suffix)",
    )
    sample.add_argument("--out", required=True, help="output folder: images/, grid.png, samples.jsonl, sample.json")
    sample.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    sample.add_argument("--num-steps", type=int, default=40, help="denoising steps (default 40, the paper's eval)")
    sample.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale (default: student.guidance; a teacher's own guidance for teacher:TASK)",
    )
    sample.add_argument("--resolution", type=int, default=None, help="pixels (default: sampling.resolution)")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sample.add_argument("--batch-size", type=int, default=4)
    sample.add_argument("--grid-max", type=int, default=64, help="images in grid.png")
    sample.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sample.add_argument("--device", default=None)
    sample.set_defaults(func=_reporting_reward_errors(_sample))

    ev = subparsers.add_parser("eval", help="score sample folders per task with pluggable rewards; results table")
    ev.add_argument("samples", nargs="*", metavar="[LABEL=]FOLDER", help="sample folders (label: the table row)")
    ev.add_argument("--rewards", help="reward spec YAML: rewards: {task: [{name: ..., options}], '*': [...]}")
    ev.add_argument("--out", help="output folder: results.json, results.md, scores/")
    ev.add_argument("--device", default=None)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--list", action="store_true", help="list the rewards and whether they can run here")
    ev.set_defaults(func=_reporting_reward_errors(_eval))

    from opd_fast.evaluate.server import DEFAULT_PORT, TOKEN_ENV  # no fastapi import: the module loads it lazily

    server = subparsers.add_parser(
        "reward-server",
        help="serve one reward over HTTP (FastAPI + uvicorn), for the `remote` reward of eval or training elsewhere",
    )
    server.add_argument("--reward", required=True, help="the reward to serve (opd-fast eval --list)")
    server.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a reward option, the value read as YAML, e.g. --option model=/m/PickScore_v1 --option device=cuda:1",
    )
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port")
    server.add_argument(
        "--token",
        default=None,
        help=f"shared secret clients send as 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}, which is better: "
        "other users of the machine can read a command line)",
    )
    server.add_argument("--max-request-mb", type=float, default=256, help="largest request body accepted (413 above)")
    server.set_defaults(func=_reporting_reward_errors(_reward_server))
