// C interface of the standalone CUDA kernels of the fused OPD step (csrc/opd_step_cuda.cu). No torch here: raw
// pointers and a stream, so the .cu compiles with nvcc alone (csrc/check_nvcc.sh) and the torch binding
// (csrc/opd_step_cuda_binding.cpp) is the only part that needs a CUDA build of torch.
//
// Layout: x, noise, x_next are (B, N) rows of x_dtype; v_student, v_teacher, grad are (B, N) rows of v_dtype, or
// (2B, N) = [uncond; cond] when the matching *_cfg flag is set; coef is (4, B) float32 = x_coef, v_coef, sbar, w;
// partial is (B, cdiv(N, chunk)) float32; loss is (B,) float32. chunk must be a multiple of OPD_CUDA_CHUNK_QUANTUM.
// The log-density (all NULL for the plain step): sample (B, N) of x_dtype, the state x' (NULL: x_next as stored);
// sq_partial like partial and sq (B,) float32, sum_n (x' - mu_S)^2; grad_sq (B,) float32, the gradient of sq.
// Both functions return a cudaError_t as int (0 on success; cudaErrorInvalidValue for bad dtypes or arguments).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#define OPD_CUDA_DTYPE_FLOAT32 0
#define OPD_CUDA_DTYPE_BFLOAT16 1
#define OPD_CUDA_DTYPE_FLOAT16 2
#define OPD_CUDA_CHUNK_QUANTUM 2048 /* threads per block (256) x elements per thread per step (8) */

#ifdef __cplusplus
extern "C" {
#endif

// x_next = x_coef x + v_coef v_s + sbar noise (noise may be NULL: not read); loss[b] = w[b] sum_n (v_s - v_t)^2;
// with sq and sq_partial given, sq[b] = sum_n (x' - mu_S)^2.
int opd_step_cuda_forward(int x_dtype, int v_dtype, const void* x, const void* v_student, const void* v_teacher,
                          const void* noise, const float* coef, void* x_next, float* partial, float* loss,
                          const void* sample, float* sq_partial, float* sq, int64_t B, int64_t N, int64_t chunk,
                          int student_cfg, float student_guidance, int teacher_cfg, float teacher_guidance,
                          cudaStream_t stream);

// grad = 2 w[b] g[b] (v_s - v_t), split (1 - gw, gw) over [uncond; cond] if student_cfg; g[b] = grad_loss[b * stride];
// with grad_sq given, plus grad_sq[b] (-2 v_coef) (sample - mu_S) before the split (x, sample of x_dtype).
int opd_step_cuda_backward(int v_dtype, const void* v_student, const void* v_teacher, const float* coef,
                           const float* grad_loss, int64_t grad_loss_stride, void* grad, int x_dtype, const void* x,
                           const void* sample, const float* grad_sq, int64_t B, int64_t N, int64_t chunk,
                           int student_cfg, float student_guidance, int teacher_cfg, float teacher_guidance,
                           cudaStream_t stream);

#ifdef __cplusplus
}
#endif
