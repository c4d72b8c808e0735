"""opd-fast: high-throughput multi-task on-policy distillation (DiffusionOPD) for flow-matching text-to-image models."""

__version__ = "0.1.0"
