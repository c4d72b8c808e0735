"""What a caller adds to a training run without patching the trainer: three points of every round.

    before_round(trainer, round_idx)      the round is about to run (round_idx: 0-based, as trainer.round)
    after_gradients(trainer, round_idx)   the round's gradient is accumulated (engine.params' .grad on the single and
                                          DDP engines) and not yet stepped or dropped
    after_record(trainer, record)         the round's metrics record was written (its "seconds" exclude the hooks)

Subclass Hook and override what you need: a profiler's capture window, a benchmark's timer and gradient capture,
the demo's reward curves, an evaluation every N rounds. Hooks run on every rank; act on rank 0 only where it matters
(trainer.dist.is_main).
"""

from __future__ import annotations


class Hook:
    def before_round(self, trainer, round_idx: int) -> None:
        pass

    def after_gradients(self, trainer, round_idx: int) -> None:
        pass

    def after_record(self, trainer, record: dict) -> None:
        pass

    def close(self) -> None:
        """The run ended (or failed): release what the hook holds."""
