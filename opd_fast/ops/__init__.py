"""The operators of opd-fast, one folder per op: its dispatch, plain reference, autograd Function and kernels side by
side (flash-linear-attention's layout). Today one op:

    opd_step/   one OPD transition and its loss (see opd_fast/ops/opd_step/__init__.py)

`opd_fast.ops.opd_step` is the function (the documented API), not its folder: reach the folder's modules with
`from opd_fast.ops.opd_step import naive, fused`, which looks them up by module name. An attribute chain such as
`import opd_fast.ops.opd_step.fused as f` would walk through the function and fail.
"""

from opd_fast.ops.opd_step import BACKENDS, LossSpec, available_backends, opd_step, resolve_backend

__all__ = ["BACKENDS", "LossSpec", "available_backends", "opd_step", "resolve_backend"]
