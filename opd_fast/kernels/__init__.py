"""Triton kernels (imports triton). Importing this package fixes compiled vs interpreted mode for its kernels:
TRITON_INTERPRET=1 must be in the environment before the import to run them on CPU tensors."""

from opd_fast.kernels.opd_step import opd_step_backward, opd_step_forward, opd_step_fwd_kernel

# triton.jit returns an InterpretedFunction instead of a JITFunction when TRITON_INTERPRET=1 was set at decoration.
INTERPRETED = type(opd_step_fwd_kernel).__name__ == "InterpretedFunction"

__all__ = ["INTERPRETED", "opd_step_backward", "opd_step_forward"]
