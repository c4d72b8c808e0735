"""Named fault points, for the fault-injection tests: a process killed or stopped at an exact point of its work.

    OPD_FAST_FAULT=ACTION:POINT[:N]   ACTION kill (SIGKILL: nothing runs after it) or stop (SIGSTOP: a hung
                                      process); the Nth time (default 1) this process reaches POINT
    OPD_FAST_FAULT_RANK=R             only the rank R (RANK) acts

Where a crash or a hang hurts most is a moment, not a place in the code a test can wait for from outside (between a
checkpoint's rename and the pruning of the old ones lasts microseconds); a named point makes each such moment
reachable every time. Unset (always, outside the tests), `point` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV, RANK_ENV = "OPD_FAST_FAULT", "OPD_FAST_FAULT_RANK"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
POINTS = (
    "checkpoint.written",  # the checkpoint's files are in its temporary folder, not yet renamed into place
    "checkpoint.renamed",  # renamed into place; the older checkpoints not yet pruned
    "checkpoint.pruning",  # one older checkpoint deleted, others may follow
    "export.written",  # an exported LoRA folder is written under its temporary name
    "round.done",  # a round's record was written (the Nth round)
)
_reached: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, where, *nth = spec.split(":")
    if action not in ACTIONS or where not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: expected ACTION:POINT[:N], ACTION in {sorted(ACTIONS)}, POINT in {POINTS}")
    if where != name or os.environ.get(RANK_ENV, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth[0] if nth else 1):
        os.kill(os.getpid(), ACTIONS[action])
