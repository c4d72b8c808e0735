// Thin torch binding of the standalone CUDA kernels (extension opd_fast._C_cuda): checks tensors, fetches the
// current stream, calls the extern "C" launchers of opd_step_cuda.cu. Built only where torch has CUDA (setup.py).
//
// Includes ATen's Tensor and torch's pybind casters (at::Tensor, std::optional) rather than torch/extension.h, which
// pulls in most of libtorch's headers; opd_step_cpu.cpp does the same (setup.py says what it saves).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

#include "opd_step_cuda.h"

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return OPD_CUDA_DTYPE_FLOAT32;
    case at::kBFloat16: return OPD_CUDA_DTYPE_BFLOAT16;
    case at::kHalf: return OPD_CUDA_DTYPE_FLOAT16;
    default: break;
  }
  TORCH_CHECK(false, "opd_fast._C_cuda: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return -1;
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t N, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "opd_fast._C_cuda: ", name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "opd_fast._C_cuda: ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == N, "opd_fast._C_cuda: ", name, " must be (", rows,
              ", ", N, "), got ", t.sizes());
}

void check_f32(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == at::kFloat, "opd_fast._C_cuda: ", name,
              " must be float32 on ", like.device());
}

void check_chunk(int64_t chunk) {
  TORCH_CHECK(chunk > 0 && chunk % OPD_CUDA_CHUNK_QUANTUM == 0,
              "opd_fast._C_cuda: chunk must be a positive multiple of ", OPD_CUDA_CHUNK_QUANTUM, ", got ", chunk);
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "opd_fast._C_cuda: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

void opd_step_forward_cuda(const at::Tensor& x, const at::Tensor& v_student, const at::Tensor& v_teacher,
                           const std::optional<at::Tensor>& noise, const at::Tensor& coef,
                           std::optional<double> student_guidance, std::optional<double> teacher_guidance,
                           const at::Tensor& x_next, const at::Tensor& partial, const at::Tensor& loss, int64_t chunk,
                           const std::optional<at::Tensor>& sq, const std::optional<at::Tensor>& sq_partial,
                           const std::optional<at::Tensor>& sample) {
  TORCH_CHECK(x.dim() == 2, "opd_fast._C_cuda: x must be (B, N)");
  check_chunk(chunk);
  const int64_t B = x.size(0), N = x.size(1);
  check_rows(x, "x", B, N, x);
  check_rows(v_student, "v_student", student_guidance ? 2 * B : B, N, x);
  check_rows(v_teacher, "v_teacher", teacher_guidance ? 2 * B : B, N, x);
  TORCH_CHECK(v_student.scalar_type() == v_teacher.scalar_type(),
              "opd_fast._C_cuda: v_student and v_teacher dtypes differ");
  if (noise) {
    check_rows(*noise, "noise", B, N, x);
    TORCH_CHECK(noise->scalar_type() == x.scalar_type(), "opd_fast._C_cuda: noise and x dtypes differ");
  }
  check_rows(x_next, "x_next", B, N, x);
  TORCH_CHECK(x_next.scalar_type() == x.scalar_type(), "opd_fast._C_cuda: x_next and x dtypes differ");
  check_rows(partial, "partial", B, (N + chunk - 1) / chunk, x);
  check_f32(partial, "partial", x);
  check_rows(coef, "coef", 4, B, x);
  check_f32(coef, "coef", x);
  check_f32(loss, "loss", x);
  TORCH_CHECK(loss.is_contiguous() && loss.numel() == B, "opd_fast._C_cuda: loss must be (B,) contiguous");
  const bool log_prob = sq.has_value();
  TORCH_CHECK(log_prob == sq_partial.has_value(), "opd_fast._C_cuda: sq and sq_partial are given together");
  TORCH_CHECK(log_prob || !sample, "opd_fast._C_cuda: sample is read only for the log-density (pass sq, sq_partial)");
  if (log_prob) {
    check_rows(*sq_partial, "sq_partial", B, (N + chunk - 1) / chunk, x);
    check_f32(*sq_partial, "sq_partial", x);
    check_f32(*sq, "sq", x);
    TORCH_CHECK(sq->is_contiguous() && sq->numel() == B, "opd_fast._C_cuda: sq must be (B,) contiguous");
    if (sample) {
      check_rows(*sample, "sample", B, N, x);
      TORCH_CHECK(sample->scalar_type() == x.scalar_type(), "opd_fast._C_cuda: sample and x dtypes differ");
    }
  }

  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(opd_step_cuda_forward(dtype_code(x, "x"), dtype_code(v_student, "v_student"), x.data_ptr(),
                                     v_student.data_ptr(), v_teacher.data_ptr(), noise ? noise->data_ptr() : nullptr,
                                     coef.data_ptr<float>(), x_next.data_ptr(), partial.data_ptr<float>(),
                                     loss.data_ptr<float>(), sample ? sample->data_ptr() : nullptr,
                                     log_prob ? sq_partial->data_ptr<float>() : nullptr,
                                     log_prob ? sq->data_ptr<float>() : nullptr, B, N, chunk,
                                     student_guidance.has_value(),
                                     static_cast<float>(student_guidance.value_or(0.0)), teacher_guidance.has_value(),
                                     static_cast<float>(teacher_guidance.value_or(0.0)),
                                     c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               "opd_step_cuda_forward");
}

void opd_step_backward_cuda(const at::Tensor& v_student, const at::Tensor& v_teacher, const at::Tensor& coef,
                            const at::Tensor& grad_loss, std::optional<double> student_guidance,
                            std::optional<double> teacher_guidance, const at::Tensor& grad, int64_t chunk,
                            const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& sample,
                            const std::optional<at::Tensor>& grad_sq) {
  TORCH_CHECK(coef.dim() == 2 && v_student.dim() == 2, "opd_fast._C_cuda: coef must be (4, B), v_student (rows, N)");
  check_chunk(chunk);
  const int64_t B = coef.size(1), N = v_student.size(1);
  check_rows(v_student, "v_student", student_guidance ? 2 * B : B, N, v_student);
  check_rows(v_teacher, "v_teacher", teacher_guidance ? 2 * B : B, N, v_student);
  check_rows(grad, "grad", student_guidance ? 2 * B : B, N, v_student);
  TORCH_CHECK(v_teacher.scalar_type() == v_student.scalar_type() && grad.scalar_type() == v_student.scalar_type(),
              "opd_fast._C_cuda: v_student, v_teacher and grad dtypes differ");
  check_rows(coef, "coef", 4, B, v_student);
  check_f32(coef, "coef", v_student);
  check_f32(grad_loss, "grad_loss", v_student);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == B, "opd_fast._C_cuda: grad_loss must be (B,)");
  const bool log_prob = grad_sq.has_value();
  TORCH_CHECK(log_prob == x.has_value() && log_prob == sample.has_value(),
              "opd_fast._C_cuda: x, sample and grad_sq are given together (the log-density's gradient)");
  if (log_prob) {
    check_rows(*x, "x", B, N, v_student);
    check_rows(*sample, "sample", B, N, v_student);
    TORCH_CHECK(sample->scalar_type() == x->scalar_type(), "opd_fast._C_cuda: sample and x dtypes differ");
    check_f32(*grad_sq, "grad_sq", v_student);
    TORCH_CHECK(grad_sq->is_contiguous() && grad_sq->numel() == B, "opd_fast._C_cuda: grad_sq must be (B,) contiguous");
  }

  const c10::cuda::CUDAGuard guard(v_student.device());
  check_launch(opd_step_cuda_backward(dtype_code(v_student, "v_student"), v_student.data_ptr(), v_teacher.data_ptr(),
                                      coef.data_ptr<float>(), grad_loss.data_ptr<float>(), grad_loss.stride(0),
                                      grad.data_ptr(), log_prob ? dtype_code(*x, "x") : OPD_CUDA_DTYPE_FLOAT32,
                                      log_prob ? x->data_ptr() : nullptr, log_prob ? sample->data_ptr() : nullptr,
                                      log_prob ? grad_sq->data_ptr<float>() : nullptr, B, N, chunk,
                                      student_guidance.has_value(),
                                      static_cast<float>(student_guidance.value_or(0.0)), teacher_guidance.has_value(),
                                      static_cast<float>(teacher_guidance.value_or(0.0)),
                                      c10::cuda::getCurrentCUDAStream(v_student.device().index()).stream()),
               "opd_step_cuda_backward");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused OPD step on CUDA (standalone kernels in opd_step_cuda.cu); see opd_fast/ops/opd_step/fused.py";
  m.def("forward", &opd_step_forward_cuda, "fused OPD step forward (writes x_next, partial, loss)", py::arg("x"),
        py::arg("v_student"), py::arg("v_teacher"), py::arg("noise"), py::arg("coef"), py::arg("student_guidance"),
        py::arg("teacher_guidance"), py::arg("x_next"), py::arg("partial"), py::arg("loss"), py::arg("chunk"),
        py::kw_only(), py::arg("sq") = py::none(), py::arg("sq_partial") = py::none(), py::arg("sample") = py::none());
  m.def("backward", &opd_step_backward_cuda, "fused OPD step backward (writes grad of v_student)",
        py::arg("v_student"), py::arg("v_teacher"), py::arg("coef"), py::arg("grad_loss"),
        py::arg("student_guidance"), py::arg("teacher_guidance"), py::arg("grad"), py::arg("chunk"), py::kw_only(),
        py::arg("x") = py::none(), py::arg("sample") = py::none(), py::arg("grad_sq") = py::none());
  m.attr("CHUNK_QUANTUM") = OPD_CUDA_CHUNK_QUANTUM;
  m.attr("HAS_LOG_PROB") = true;  // fused.py refuses log_prob on a _C_cuda built before it (a stale in-place build)
}
