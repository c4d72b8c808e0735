"""Process groups for the multi-process engines: joined from the launcher's environment, with a bounded timeout.

torchrun and the deepspeed launcher both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (the
deepspeed launcher also passes --local_rank=N, which opd_fast.cli checks against LOCAL_RANK); for ranks that SLURM's
srun started directly, `setup` (and opd_fast.cli, before it) exports the same from srun's variables
(`slurm_launch_env`), so a script that builds a Trainer itself runs under srun as the CLI does. The backend follows the
device: NCCL for cuda:LOCAL_RANK, gloo on CPU. Every collective gets engine.timeout_s, so a rank that died or hangs
makes the others fail instead of waiting forever: gloo raises at once on a closed connection and after the timeout
on a silent peer; NCCL's watchdog aborts the process after the timeout. `fail()` turns such an error into one clear
line and a prompt exit (os._exit: interpreter shutdown could block on the dead group again); `finish()` ends a rank
whose work is done, also without the interpreter's shutdown, which can abort it (see there).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from opd_fast.config import ConfigError, EngineConfig, first_line

log = logging.getLogger(__name__)
EXIT_PEER_LOST = 3  # the exit status of a rank that lost contact with another one


class DistributedError(RuntimeError):
    """A collective op failed: another rank died, hung past engine.timeout_s, or the group could not form."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


# Every collective of opd-fast goes through these helpers, on the rank's device: an NCCL group refuses CPU tensors
# (gloo would hide that in the CPU tests), and a tensor already on the device saves a host-to-device copy.
def all_reduce(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """`t` reduced over the ranks (op: sum | max | min), as a new tensor on the rank's device (t is not changed)."""
    out = t.detach().to(info.device, copy=True)
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return out


def all_gather_flat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's `t` flattened and concatenated in rank order (world_size * t.numel(),), on the rank's device."""
    piece = t.detach().flatten().to(info.device).contiguous()
    out = torch.empty(piece.numel() * info.world_size, dtype=piece.dtype, device=info.device)
    dist.all_gather_into_tensor(out, piece)
    return out


def slurm_launch_env(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """What torchrun would export, for ranks that srun started itself (`srun -N 2 --ntasks-per-node 8 python -m
    opd_fast.cli train ...`): rank SLURM_PROCID of SLURM_STEP_NUM_TASKS, local rank SLURM_LOCALID, the master on the
    step's first node at port 20000 + SLURM_JOB_ID % 20000 (MASTER_ADDR / MASTER_PORT, where set, win). Empty where
    a launcher already set RANK (torchrun inside srun), outside an srun step, or for a step of one task."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS")
    if "RANK" in environ or tasks is None or tasks.strip() == "1":
        return {}
    missing = [v for v in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST") if not environ.get(v)]
    if missing:
        raise ConfigError(
            f"launcher environment: srun started SLURM_STEP_NUM_TASKS={tasks} tasks but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set"
        )
    try:
        port = environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    except ValueError:
        raise ConfigError(
            f"launcher environment: SLURM_JOB_ID={environ['SLURM_JOB_ID']!r} is not an integer; set MASTER_PORT"
        ) from None
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": tasks,
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(environ["SLURM_STEP_NODELIST"]),
        "MASTER_PORT": port,
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu-[007-010,12],login1" -> "gpu-007", "rack[2-3]-n[01-04]" ->
    "rack2-n01" (what `scontrol show hostnames` would list first)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())


def cuda_device_index(local_rank: int, count: int) -> int:
    """This rank's GPU: cuda:LOCAL_RANK, or the only GPU a rank sees when the scheduler gave each task its own
    (srun --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per task)."""
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise ConfigError(
        f"launcher environment: LOCAL_RANK={local_rank} but this process sees {count} GPUs "
        "(CUDA_VISIBLE_DEVICES); start at most one rank per visible GPU"
    )


def pick_device(requested: str | None, local_rank: int, cuda_count: int) -> torch.device:
    """This rank's device: `requested` ("cpu", "cuda", "cuda:1"; None = a GPU when there is one), with a bare "cuda"
    made this rank's GPU (cuda:LOCAL_RANK): torch.cuda.set_device and DDP's device_ids need an index."""
    dev = torch.device(requested) if requested is not None else torch.device("cuda" if cuda_count else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", cuda_device_index(local_rank, cuda_count))
    return dev


def shared_store_restart_hazard(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """A warning when torchrun may restart the ranks (--max-restarts > 0) while they share its rendezvous store: the
    failed attempt's keys stay in that store, so a restarted group can read a dead rank's address and hang forming
    a process group (pytorch/pytorch#135712; how often: bench/RESULTS.md, section "torchrun restarts on a shared
    rendezvous store")."""
    try:
        restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return None
    if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (
            f"torchrun --max-restarts {restarts} with its shared rendezvous store: a restarted group can hang "
            "on the failed attempt's keys (pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "before torchrun so that every attempt gets a store of its own"
        )
    return None


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as the launcher exported them; (0, 1, 0) for a plain `python` start."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank if world == 1 else -1)))
    except ValueError as e:
        raise ConfigError(f"launcher environment: RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None
    if world > 1 and local < 0:
        raise ConfigError(
            "launcher environment: WORLD_SIZE > 1 but LOCAL_RANK is not set; start the ranks with "
            "torchrun or the deepspeed launcher (they set it)"
        )
    if not 0 <= rank < world:
        raise ConfigError(f"launcher environment: RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def setup(cfg: EngineConfig, device: str | None = None) -> DistInfo:
    """Join the process group the environment describes (idempotent) and pick this rank's device.

    The single engine never forms a group. DeepSpeed needs one even for one process: a world of one is formed on an
    in-process store, so no port is needed. Ranks that srun started itself get torchrun's variables first.
    """
    os.environ.update(slurm_launch_env())
    rank, world, local = launcher_env()
    if cfg.kind == "single" and world > 1:
        raise ConfigError(
            f"engine.kind: 'single' but the launcher started WORLD_SIZE={world} ranks; set "
            "engine.kind: deepspeed or ddp (or start one process)"
        )
    dev = pick_device(device, local, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local, dev, cfg.timeout_s)
    if cfg.kind == "single" or dist.is_initialized():
        return info
    for var, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
        os.environ.setdefault(var, str(value))  # DeepSpeed reads them even for a world of one
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    device_id = dev if dev.type == "cuda" else None  # NCCL binds the rank to its GPU at once (barriers use it)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id
        )
    else:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ConfigError(
                    f"launcher environment: WORLD_SIZE={world} but {var} is not set; start the ranks "
                    "with torchrun or the deepspeed launcher"
                )
        try:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, device_id=device_id)
        except Exception as e:  # the store did not form within the timeout: a rank never came up
            raise DistributedError(
                f"rank {rank}: could not form the {world}-rank {backend} group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                f"{cfg.timeout_s}s ({first_line(e)})"
            ) from e
    bound_new_groups(timeout)
    log.info(
        "rank %d of %d (local rank %d) on %s, %s, collective timeout %ds",
        rank,
        world,
        local,
        dev,
        backend,
        cfg.timeout_s,
    )
    hazard = shared_store_restart_hazard()
    if hazard and rank == 0:
        log.warning(hazard)
    return info


def bound_new_groups(timeout: datetime.timedelta) -> None:
    """Give every group formed later the world group's timeout. DeepSpeed forms its own groups (the data-parallel
    group of its gradient all-reduce is a clone of the world) with dist.new_group(ranks) and no timeout, which torch
    fills with its default of 30 minutes (10 for NCCL): a hung rank then held the others for half an hour instead of
    engine.timeout_s. torch has no public setting for that default, so its module-level value is set; a torch
    without it keeps its default (a longer wait, never a wrong result)."""
    from torch.distributed import distributed_c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(distributed_c10d, name, None), datetime.timedelta):
            setattr(distributed_c10d, name, timeout)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish(code: int = 0) -> NoReturn:
    """End a rank of a multi-rank run whose work is done: leave the group, flush, and exit without the interpreter's
    finalization.

    A plain return can abort a run that succeeded. gloo's worker threads outlive destroy_process_group (DeepSpeed
    keeps the groups referenced) and drop finished collectives in their own time; a drop that frees a tensor Python
    has let go of takes the GIL, and during finalization that ends the thread inside C++: std::terminate, exit -6
    ("terminate called without an active exception"); pytorch/pytorch#179291. A barrier first does not help, as it
    holds on to the earlier work. Nothing is lost: checkpoints and exports are written and renamed before this, and
    the metrics log is closed. How often it struck, and the fix measured: bench/RESULTS.md, section "A finished
    multi-rank run that exited -6, and diffusers' `dtype` (CPU)"."""
    shutdown()
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Flush the logs and the standard streams and exit at once: no atexit handlers, no group teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def rank_zero_first(info: DistInfo):
    """Rank 0 runs the block first (e.g. writes a cache), then the others (which then read it)."""
    if not info.is_main:
        info.barrier()
    yield
    if info.is_main:
        info.barrier()


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception is a collective op failing (gloo/NCCL error, timeout), not a bug of this rank."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "connection reset", "connection closed", "timed out")
    )


def fail(e: BaseException) -> None:
    """Report a fatal error of a multi-rank run on stderr and exit now, never returning.

    A lost peer gets one line naming this rank and the likely cause; anything else also gets its traceback. os._exit
    skips atexit handlers and process-group teardown, which can block on a dead peer; it also closes this rank's
    connections at once, so the other ranks fail fast instead of waiting out their timeout."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if isinstance(e, DistributedError):
        msg, code = f"opd-fast: error: {e}", EXIT_PEER_LOST
    elif is_peer_failure(e):
        msg = (
            f"opd-fast: error: rank {rank} of {world}: lost contact with another rank (it died, or hung longer "
            f"than engine.timeout_s); see the other ranks' logs. Collective error: {first_line(e)}"
        )
        code = EXIT_PEER_LOST
    else:
        traceback.print_exception(e)
        msg, code = f"opd-fast: error: rank {rank} of {world} failed: {type(e).__name__}: {first_line(e)}", 1
    print(msg, file=sys.stderr, flush=True)
    exit_now(code)
