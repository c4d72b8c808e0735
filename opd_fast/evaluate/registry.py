"""Every reward by name. Importing this module loads the modules that define rewards (each class registers itself
there with @register), so `REWARDS` here is complete: `opd-fast eval --list` and the reward spec read it.

Adding a reward: a class with @register("name") in rewards.py (or a new module, imported below). remote.py's
`remote` scores through an `opd-fast reward-server` (server.py) that serves any of the others.
"""

from __future__ import annotations

import inspect

# imported for their @register side effect (demo_reward: `demo`, the demo world's rewards)
from opd_fast.evaluate import demo_reward, geneval, remote, rewards  # noqa: F401
from opd_fast.evaluate.base import REWARDS, Reward, RewardError

__all__ = ["REWARDS", "build_reward"]


def build_reward(name: str, **options) -> Reward:
    """The reward `name` built with its options; RewardError names an unknown reward or option, or what is missing."""
    cls = REWARDS.get(name)
    if cls is None:
        raise RewardError(f"unknown reward {name!r} (known: {', '.join(sorted(REWARDS))})")
    reason = cls.unavailable()
    if reason:
        raise RewardError(reason)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise RewardError(f"reward {name!r}: unknown option(s) {unknown} (allowed: {', '.join(sorted(allowed))})")
    return cls(**options)
