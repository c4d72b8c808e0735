"""The CUDA C++ kernels (csrc/opd_step_cuda.cu, with nvcc; the plain step's and the log-density's instantiations) and
the Triton kernels (opd_fast/ops/opd_step/triton.py) compile for sm_90, and the CUDA kernels' vector path is 128-bit
loads and stores in the SASS: compile only, no GPU needed, so CI catches a broken GPU build. Running them is
tests/test_kernels.py's and tests/test_logprob.py's job."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.exists() else None
    return found


def test_cuda_kernels_compile_for_sm90(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in $CUDA_HOME/bin: the CUDA compile check needs a CUDA toolkit")
    obj = tmp_path / "opd_step_cuda.o"
    result = subprocess.run(
        ["bash", str(ROOT / "csrc" / "check_nvcc.sh"), str(obj)],
        env={**os.environ, "NVCC": nvcc},
        check=False,  # the assertion below shows the compiler output
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout}\n{result.stderr}"
    assert obj.stat().st_size > 0
    if shutil.which("nm"):  # the extern "C" launchers the torch binding links against
        symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
        for name in ("opd_step_cuda_forward", "opd_step_cuda_backward"):
            assert f" T {name}" in symbols, f"{name} is not exported by {obj.name}"


def _cuda_include(nvcc: str | None) -> Path | None:
    """The toolkit's include folder (cuda_runtime.h): $CUDA_HOME, beside nvcc, or /usr/local/cuda."""
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    if nvcc is not None:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)


def test_cuda_binding_parses_against_torch_headers(tmp_path):
    """The torch binding (csrc/opd_step_cuda_binding.cpp) against this torch's headers, syntax only: it is built only
    where torch has CUDA, so without this its changes (the launchers' arguments, the log-density keywords) would
    first be compiled on a GPU machine. A CPU build of torch ships c10/cuda's headers but not the CMake-generated
    one; a stand-in defines what it would."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++ / g++) on PATH")
    cuda_include = _cuda_include(_nvcc())
    if cuda_include is None:
        pytest.skip("cuda_runtime.h not found in $CUDA_HOME/include, beside nvcc or in /usr/local/cuda/include")
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_includes = [f"-I{p}" for p in include_paths()]
    cmd = [compiler, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C_cuda", *torch_includes]
    cmd += [f"-I{tmp_path}", f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}"]
    result = subprocess.run(
        cmd + [str(ROOT / "csrc" / "opd_step_cuda_binding.cpp")],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"the binding does not compile:\n{result.stderr[-4000:]}"


def _cuobjdump(nvcc: str) -> str | None:
    """cuobjdump from PATH, the toolkit of nvcc / $CUDA_HOME, or the copy triton's wheel ships (found, not imported)."""
    candidates = [shutil.which("cuobjdump"), str(Path(nvcc).parent / "cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _kernel_name(mangled: str) -> str:
    """opd_step_fwd_kernel<__half, float, true> for a mangled kernel name (itself where c++filt is absent)."""
    if shutil.which("c++filt") is None:
        return mangled
    full = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=False).stdout.strip()
    return re.sub(r"^void |\(anonymous namespace\)::|\(.*$", "", full) or mangled


# The VEC instantiations (opd_step_{fwd,bwd}_kernel<..., LOG_PROB, true>: N % 8 == 0, 16-byte aligned pointers) move
# every element as 16-byte vectors; the only narrower global accesses are these per-block scalars, by (kind, LOG_PROB).
_NARROW_ALLOWED = {
    ("fwd", False): {"LDG": 3, "STG": 1},  # loads of x_coef, v_coef, sbar; the store of the block's partial sum
    ("fwd", True): {"LDG": 3, "STG": 2},  # ... and the store of the log-density's partial sum
    ("bwd", False): {"LDG": 2, "STG": 0},  # loads of w and grad_loss
    ("bwd", True): {"LDG": 5, "STG": 0},  # ... and of x_coef, v_coef and grad_sq
}


def _vec_kind(mangled: str) -> tuple[str, bool]:
    """("fwd" | "bwd", LOG_PROB) of a VEC instantiation, from its mangled template arguments (..., Lb<0|1>E, Lb1E)."""
    log_prob = re.search(r"_kernelI.*Lb([01])ELb1EE", mangled)
    return ("fwd" if "_fwd_" in mangled else "bwd"), log_prob is not None and log_prob.group(1) == "1"


def test_cuda_vec_path_moves_128_bit_vectors(tmp_path):
    """The VEC path stores (and loads) each 16 bytes with one 128-bit instruction. Only the SASS shows it: nvcc once
    emitted the bf16 / fp16 16-byte stores as four 32-bit STG.E each (csrc/opd_step_cuda.cu, vec16, says why)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in $CUDA_HOME/bin: the SASS check needs a CUDA toolkit")
    cuobjdump = _cuobjdump(nvcc)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found on PATH, beside nvcc, in $CUDA_HOME/bin or in triton's backends/nvidia/bin")
    cubin = tmp_path / "opd_step_cuda.cubin"
    result = subprocess.run(
        ["bash", str(ROOT / "csrc" / "check_nvcc.sh"), str(cubin)],
        env={**os.environ, "NVCC": nvcc},
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout}\n{result.stderr}"
    dump = subprocess.run([cuobjdump, "-sass", str(cubin)], check=False, capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, f"{cuobjdump} -sass failed:\n{dump.stdout}\n{dump.stderr}"

    parts = re.split(r"^\s*Function : (\S+)\s*$", dump.stdout, flags=re.MULTILINE)
    kernels = dict(zip(parts[1::2], parts[2::2], strict=True))
    vec = {name: body for name, body in kernels.items() if re.search(r"opd_step_(fwd|bwd)_kernelI.*Lb1EE", name)}
    kinds = Counter(_vec_kind(name) for name in vec)
    # forward: 3 x 3 (x, v) dtype pairs, with and without the log-density; backward: 3 v dtypes for the plain step,
    # 3 x 3 (x, v) with the log-density. A kernel renamed away must not make this test vacuous.
    want = {("fwd", False): 9, ("fwd", True): 9, ("bwd", False): 3, ("bwd", True): 9}
    assert kinds == want, f"VEC instantiations found: {sorted(map(_kernel_name, vec))}"
    problems = []
    for name, body in sorted(vec.items()):
        kind = _vec_kind(name)
        # LDG / STG and their modifiers (.E.128, .E.CONSTANT, .E.U16, ...); LDGSTS etc. are other instructions
        ops = re.findall(r"\b(LDG|STG)((?:\.\w+)*)(?=\s)", body)
        wide = Counter(op for op, mods in ops if "128" in mods.split("."))
        narrow = Counter(f"{op}{mods}" for op, mods in ops if "128" not in mods.split("."))
        for op in ("LDG", "STG"):
            narrow_op = {instr: n for instr, n in narrow.items() if instr.startswith(op)}
            if wide[op] == 0 or sum(narrow_op.values()) > _NARROW_ALLOWED[kind][op]:
                problems.append(
                    f"{_kernel_name(name)}: {wide[op]} x {op}.128, narrower {narrow_op or 'none'} "
                    f"(at most {_NARROW_ALLOWED[kind][op]} allowed, the per-block scalars)"
                )
    assert not problems, "VEC path not 128-bit:\n" + "\n".join(problems)


# Run in a fresh interpreter: tests/conftest.py sets TRITON_INTERPRET=1 here, and compiled mode is fixed per process.
_TRITON_AOT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from opd_fast.ops.opd_step import triton as K

aligned = ["x_ptr", "v_student_ptr", "v_teacher_ptr", "noise_ptr", "coef_ptr", "x_next_ptr", "partial_ptr", "N"]
fwd = {"x_ptr": "*bf16", "v_student_ptr": "*bf16", "v_teacher_ptr": "*bf16", "noise_ptr": "*bf16", "coef_ptr": "*fp32",
       "x_next_ptr": "*bf16", "partial_ptr": "*fp32", "sample_ptr": "*bf16", "sq_partial_ptr": "*fp32", "B": "i32",
       "N": "i32", "num_chunks": "i32", "student_guidance": "fp32", "teacher_guidance": "fp32",
       "STUDENT_CFG": "constexpr", "TEACHER_CFG": "constexpr", "HAS_NOISE": "constexpr", "LOG_PROB": "constexpr",
       "OWN_SAMPLE": "constexpr", "BLOCK": "constexpr"}
bwd = {"v_student_ptr": "*fp16", "v_teacher_ptr": "*fp16", "coef_ptr": "*fp32", "grad_loss_ptr": "*fp32",
       "grad_loss_stride": "i32", "grad_ptr": "*fp16", "x_ptr": "*fp16", "sample_ptr": "*fp16", "grad_sq_ptr": "*fp32",
       "B": "i32", "N": "i32", "student_guidance": "fp32", "teacher_guidance": "fp32", "STUDENT_CFG": "constexpr",
       "TEACHER_CFG": "constexpr", "LOG_PROB": "constexpr", "BLOCK": "constexpr"}
loss = {"partial_ptr": "*fp32", "coef_ptr": "*fp32", "loss_ptr": "*fp32", "sq_partial_ptr": "*fp32", "sq_ptr": "*fp32",
        "B": "i32", "num_chunks": "i32", "LOG_PROB": "constexpr", "BLOCK_C": "constexpr"}
target = GPUTarget("cuda", 90, 32)
# the divisibility the JIT specialises on at run time when N % 16 == 0 and the tensors are 16-byte aligned
attrs = {(list(fwd).index(n),): [["tt.divisibility", 16]] for n in aligned}
for log_prob in (False, True):  # OPD's step, and the stage-1 step with its log-density (stored sample and own)
    for own in ((False, True) if log_prob else (False,)):
        fwd_consts = {"STUDENT_CFG": True, "TEACHER_CFG": True, "HAS_NOISE": True, "LOG_PROB": log_prob,
                      "OWN_SAMPLE": own, "BLOCK": 4096}
        ptx = triton.compile(ASTSource(K.opd_step_fwd_kernel, fwd, fwd_consts, attrs), target=target).asm["ptx"]
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx, f"forward (log_prob {log_prob}): no 16-byte loads/stores"
        assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx), "forward: bf16 store does not round to nearest even"
    for cfg in (False, True):
        consts = {"STUDENT_CFG": cfg, "TEACHER_CFG": not cfg, "LOG_PROB": log_prob, "BLOCK": 1024}
        triton.compile(ASTSource(K.opd_step_bwd_kernel, bwd, consts), target=target)
    triton.compile(ASTSource(K.opd_step_loss_kernel, loss, {"LOG_PROB": log_prob, "BLOCK_C": 64}), target=target)
print("triton kernels compiled for sm_90 with triton", triton.__version__)
"""


def test_triton_kernels_compile_for_sm90():
    """The Triton kernels compile (not run) for sm_90 without a GPU, through triton's own ptxas: the interpreter
    the other tests use never lowers them, so this catches what only compilation would."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_AOT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    if "No module named 'triton.backends.nvidia'" in result.stderr:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    assert result.returncode == 0, f"triton compile failed:\n{result.stdout}\n{result.stderr}"
