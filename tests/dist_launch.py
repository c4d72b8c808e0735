"""Start a world of ranks as plain processes with the environment torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), for the distributed tests. Plain processes rather than torchrun: torchrun's agent kills
the whole group when one rank dies, which would hide what the surviving ranks do on their own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], world: int, log_dir: Path, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """`python *args` once per rank; rank r's stdout/stderr go to log_dir/rank{r}.{out,err}."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        rank_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }  # as torchrun does: ranks on a shared 2-core box must not oversubscribe
        with open(log_dir / f"rank{rank}.out", "w") as out, open(log_dir / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=rank_env, stdout=out, stderr=err))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of all ranks; a rank still running after `timeout` seconds is killed (and reported as None)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    return codes


def logs(log_dir: Path) -> str:
    """All ranks' stderr, for assertion messages."""
    return "\n".join(f"--- {f.name}\n{f.read_text()[-4000:]}" for f in sorted(log_dir.glob("rank*.err")))
