"""The demo world's task rewards as a registered reward, `demo` (task: composition | glyph | aesthetic): cheap on a
CPU, so stage 1 (opd-fast teach) trains and checks a teacher end to end in CI, and `opd-fast eval` scores demo-world
images with it. The world itself (opd_fast.demo.world, numpy and torch only) loads when the reward is built.
"""

from __future__ import annotations

import numpy as np

from opd_fast.evaluate.base import Reward, RewardError, register


@register("demo")
class DemoReward(Reward):
    """The demo world's reward of `task` (composition | glyph | aesthetic), in [0, 1]; a prompt must be one of the
    task's (opd_fast.demo.world.task_prompts), whose attributes the reward checks."""

    def __init__(self, task: str | None = None, device: str | None = None, batch_size: int = 16):
        super().__init__("cpu", batch_size)
        from opd_fast.demo import world

        if task not in world.TASKS:
            raise RewardError(f"reward 'demo': option task must be one of {list(world.TASKS)}, got {task!r}")
        self.world, self.task = world, task
        self.rows = {row["prompt"]: row for row in world.task_prompts(task)}

    def score(self, images, prompts, metadata):
        scores = []
        for image, prompt in zip(images, prompts):
            row = self.rows.get(prompt)
            if row is None:
                raise RewardError(f"reward 'demo' ({self.task}): {prompt!r} is not a prompt of the task")
            pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, np.float32)
            scores.append(self.world.reward(self.task, pixels / 255.0 if pixels.max() > 1 else pixels, row))
        return scores
