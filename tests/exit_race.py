"""The teardown race distributed.finish exists for, made likely: the gloo group stays referenced after
destroy_process_group (as DeepSpeed keeps it), Python lets go of the last collectives' tensors at once, and the
interpreter finalizes next. A rank started with `finish` ends through distributed.finish; with `plain` it returns
to the interpreter, whose finalization can abort it (SIGABRT: a gloo thread takes the GIL during finalization).

Whether a plain exit aborts depends on torch, the machine and its load, not on opd-fast, so no test asserts it.
To see whether distributed.finish is still needed with the torch at hand, count the aborts of plain exits:

    python tests/exit_race.py --report 20        # 20 two-rank launches of each kind, exit codes tallied
"""

import sys


def rank_main(how: str) -> None:
    import torch
    import torch.distributed as dist

    from opd_fast import distributed

    dist.init_process_group("gloo")
    keep = dist.distributed_c10d._get_default_group()  # noqa: F841 - the reference DeepSpeed would hold
    for _ in range(5):
        dist.all_gather_into_tensor(torch.empty(2 * 2**16), torch.ones(2**16))
    dist.destroy_process_group()
    if how == "finish":
        distributed.finish(0)


def report(launches: int) -> None:
    import collections
    import tempfile
    from pathlib import Path

    from dist_launch import start, wait

    with tempfile.TemporaryDirectory() as tmp:
        for how in ("plain", "finish"):
            codes = collections.Counter()
            for i in range(launches):
                codes.update(wait(start([__file__, how], 2, Path(tmp) / f"{how}{i}"), timeout=60))
            print(f"{how}: exit codes of {2 * launches} ranks: {dict(codes)}")


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        report(int(sys.argv[2]))
    else:
        rank_main(sys.argv[1])
