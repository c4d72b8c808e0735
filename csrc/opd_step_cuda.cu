// Fused OPD step, standalone CUDA kernels (cuda_runtime.h / cuda_bf16.h / cuda_fp16.h only; see opd_step_cuda.h).
//
// Math (fp32 in registers whatever the storage dtype; formulas as in opd_fast/ops/opd_step/triton.py):
//   forward   x_next = x_coef x + v_coef v_s + sbar noise,   loss[b] = w[b] sum_n (v_s - v_t)^2
//   backward  dv_s = 2 w[b] g[b] (v_s - v_t);  CFG v = v_u + gw (v_c - v_u), dv_u = (1 - gw) dv, dv_c = gw dv
//   log-prob  sq[b] = sum_n (x' - mu_S)^2, mu_S = x_coef x + v_coef v_s; x' = the given sample, or x_next as stored
//             (rounded to X in registers, as the store rounds it); dv_s += gq[b] (-2 v_coef) (x' - mu_S)
//             (LOG_PROB instantiations: the plain step's kernels stay as they were)
//
// Grid (chunks, B), 256 threads; each thread moves 8 consecutive elements per step: one 16-byte load / store for
// bf16/fp16, two for fp32 (VEC path, taken when N % 8 == 0 and every pointer is 16-byte aligned; otherwise
// bounds-checked scalar accesses). Offsets are int64. The per-sample sum is two-stage and deterministic: a
// fixed-shape block reduction writes one partial per (sample, chunk), then one block per sample sums its partials in
// a fixed order (no atomics, so the loss is bitwise reproducible run to run).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "opd_step_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;
static_assert(kThreads * kPerThread == OPD_CUDA_CHUNK_QUANTUM, "chunk quantum");

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Raw 16-bit patterns <-> fp32, so a 16-byte vector is unpacked in registers (no local-memory round trip).
__device__ __forceinline__ float bits_to_float(uint32_t bits, __nv_bfloat16) { return __uint_as_float(bits << 16); }
__device__ __forceinline__ float bits_to_float(uint32_t bits, __half) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
__device__ __forceinline__ uint32_t float_to_bits(float v, __nv_bfloat16) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ uint32_t float_to_bits(float v, __half) { return __half_as_ushort(__float2half_rn(v)); }

// The 16-byte vector at p[i]; on the VEC path p is 16-byte aligned and i a multiple of 8. Index a Vec array rather
// than cast p + i: that shows nvcc the offset is whole vectors. From `*(uint4*)(p + i) = ...` it emitted four 32-bit
// stores (i depends on the run-time chunk), whatever the vector type's alignment, __builtin_assume_aligned or
// __builtin_assume(i % 8 == 0) said. i >= 0, so the unsigned division is a shift.
template <typename Vec, typename T>
__device__ __forceinline__ Vec* vec16(T* p, int64_t i) {
  static_assert(sizeof(Vec) == 16 && 16 % sizeof(T) == 0, "16-byte vectors of T");
  return reinterpret_cast<Vec*>(p) + static_cast<uint64_t>(i) / (16 / sizeof(T));
}

// 8 elements p[i .. i+8) as fp32; past `end` (scalar path only) they read as 0.
template <typename T, bool VEC>
__device__ __forceinline__ void load8(const T* __restrict__ p, int64_t i, int64_t end, float out[kPerThread]) {
  if constexpr (VEC && sizeof(T) == 4) {
    const float4* src = vec16<const float4>(p, i);
    const float4 a = src[0], b = src[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  } else if constexpr (VEC) {
    const uint4 raw = *vec16<const uint4>(p, i);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = bits_to_float(words[k] & 0xffffu, T{});
      out[2 * k + 1] = bits_to_float(words[k] >> 16, T{});
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) out[k] = i + k < end ? to_float(p[i + k]) : 0.0f;
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store8(T* __restrict__ p, int64_t i, int64_t end, const float in[kPerThread]) {
  if constexpr (VEC && sizeof(T) == 4) {
    float4* dst = vec16<float4>(p, i);
    dst[0] = make_float4(in[0], in[1], in[2], in[3]);
    dst[1] = make_float4(in[4], in[5], in[6], in[7]);
  } else if constexpr (VEC) {
    uint32_t words[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) words[k] = float_to_bits(in[2 * k], T{}) | (float_to_bits(in[2 * k + 1], T{}) << 16);
    *vec16<uint4>(p, i) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k)
      if (i + k < end) p[i + k] = from_float<T>(in[k]);
  }
}

// v = v_u + gw (v_c - v_u) from rows `row` and `cond_row`, or the plain row.
template <typename V, bool VEC>
__device__ __forceinline__ void load_velocity8(const V* __restrict__ v, int64_t row, int64_t cond_row, int64_t i,
                                               int64_t end, bool cfg, float gw, float out[kPerThread]) {
  load8<V, VEC>(v + row, i, end, out);
  if (cfg) {
    float cond[kPerThread];
    load8<V, VEC>(v + cond_row, i, end, cond);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) out[k] += gw * (cond[k] - out[k]);
  }
}

// v as it reads back after a store to T: the own sample of the log-density is x_next as stored.
template <typename T>
__device__ __forceinline__ float stored_value(float v) {
  return to_float(from_float<T>(v));
}

// Sum over the block in a fixed order (warp shuffles, then warp 0 over the per-warp sums); valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// LOG_PROB: also sq_partial[b, c] = sum over the chunk of (x' - mu_S)^2, x' = sample or (sample == nullptr) x_next.
template <typename X, typename V, bool LOG_PROB, bool VEC>
__global__ void __launch_bounds__(kThreads)
    opd_step_fwd_kernel(const X* __restrict__ x, const V* __restrict__ v_student, const V* __restrict__ v_teacher,
                        const X* __restrict__ noise, const float* __restrict__ coef, X* __restrict__ x_next,
                        float* __restrict__ partial, const X* __restrict__ sample, float* __restrict__ sq_partial,
                        int64_t B, int64_t N, int64_t chunk, int64_t num_chunks, bool student_cfg,
                        float student_guidance, bool teacher_cfg, float teacher_guidance) {
  const int64_t c = blockIdx.x, b = blockIdx.y;
  const int64_t begin = c * chunk, end = min(N, begin + chunk);
  const int64_t row = b * N, cond_row = (B + b) * N;
  const float x_coef = coef[b], v_coef = coef[B + b], sbar = coef[2 * B + b];
  float acc = 0.0f, acc_sq = 0.0f;
  for (int64_t i = begin + int64_t(threadIdx.x) * kPerThread; i < end; i += int64_t(kThreads) * kPerThread) {
    float xs[kPerThread], vs[kPerThread], vt[kPerThread], mean[kPerThread];
    load8<X, VEC>(x + row, i, end, xs);
    load_velocity8<V, VEC>(v_student, row, cond_row, i, end, student_cfg, student_guidance, vs);
    load_velocity8<V, VEC>(v_teacher, row, cond_row, i, end, teacher_cfg, teacher_guidance, vt);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) xs[k] = mean[k] = x_coef * xs[k] + v_coef * vs[k];
    if (noise != nullptr) {
      float ns[kPerThread];
      load8<X, VEC>(noise + row, i, end, ns);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) xs[k] += sbar * ns[k];
    }
    store8<X, VEC>(x_next + row, i, end, xs);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const float gap = vs[k] - vt[k];  // 0 past `end`: both read as 0
      acc += gap * gap;
    }
    if constexpr (LOG_PROB) {
      float target[kPerThread];
      if (sample != nullptr) {
        load8<X, VEC>(sample + row, i, end, target);
      } else {
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) target[k] = stored_value<X>(xs[k]);
      }
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const float residual = target[k] - mean[k];  // 0 past `end`: x_next and mean are 0 there
        acc_sq += residual * residual;
      }
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[b * num_chunks + c] = acc;
  if constexpr (LOG_PROB) {
    __syncthreads();  // block_sum's shared sums are read above before they are written again
    acc_sq = block_sum(acc_sq);
    if (threadIdx.x == 0) sq_partial[b * num_chunks + c] = acc_sq;
  }
}

// loss[b] = w[b] sum_c partial[b, c]; with sq given also sq[b] = sum_c sq_partial[b, c]; fixed order.
__global__ void __launch_bounds__(kThreads)
    opd_step_loss_kernel(const float* __restrict__ partial, const float* __restrict__ coef, float* __restrict__ loss,
                         const float* __restrict__ sq_partial, float* __restrict__ sq, int64_t B, int64_t num_chunks) {
  const int64_t b = blockIdx.x;
  float acc = 0.0f;
  for (int64_t k = threadIdx.x; k < num_chunks; k += kThreads) acc += partial[b * num_chunks + k];
  acc = block_sum(acc);
  if (threadIdx.x == 0) loss[b] = coef[3 * B + b] * acc;
  if (sq == nullptr) return;
  __syncthreads();
  acc = 0.0f;
  for (int64_t k = threadIdx.x; k < num_chunks; k += kThreads) acc += sq_partial[b * num_chunks + k];
  acc = block_sum(acc);
  if (threadIdx.x == 0) sq[b] = acc;
}

// LOG_PROB: x and sample (X, (B, N)) and grad_sq (B,) are read; otherwise they are never touched (X = V then).
template <typename X, typename V, bool LOG_PROB, bool VEC>
__global__ void __launch_bounds__(kThreads)
    opd_step_bwd_kernel(const V* __restrict__ v_student, const V* __restrict__ v_teacher,
                        const float* __restrict__ coef, const float* __restrict__ grad_loss, int64_t grad_loss_stride,
                        V* __restrict__ grad, const X* __restrict__ x, const X* __restrict__ sample,
                        const float* __restrict__ grad_sq, int64_t B, int64_t N, int64_t chunk, bool student_cfg,
                        float student_guidance, bool teacher_cfg, float teacher_guidance) {
  const int64_t c = blockIdx.x, b = blockIdx.y;
  const int64_t begin = c * chunk, end = min(N, begin + chunk);
  const int64_t row = b * N, cond_row = (B + b) * N;
  // g[b] folds into the per-sample scale: an all-ones g costs the same, there is no per-element multiply to skip
  const float scale = 2.0f * coef[3 * B + b] * grad_loss[b * grad_loss_stride];
  float x_coef = 0.0f, v_coef = 0.0f, scale_lp = 0.0f;
  if constexpr (LOG_PROB) x_coef = coef[b], v_coef = coef[B + b], scale_lp = -2.0f * v_coef * grad_sq[b];
  for (int64_t i = begin + int64_t(threadIdx.x) * kPerThread; i < end; i += int64_t(kThreads) * kPerThread) {
    float vs[kPerThread], vt[kPerThread];
    load_velocity8<V, VEC>(v_student, row, cond_row, i, end, student_cfg, student_guidance, vs);
    load_velocity8<V, VEC>(v_teacher, row, cond_row, i, end, teacher_cfg, teacher_guidance, vt);
    if constexpr (LOG_PROB) {
      float xs[kPerThread], target[kPerThread];
      load8<X, VEC>(x + row, i, end, xs);
      load8<X, VEC>(sample + row, i, end, target);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const float residual = target[k] - (x_coef * xs[k] + v_coef * vs[k]);
        vs[k] = scale * (vs[k] - vt[k]) + scale_lp * residual;
      }
    } else {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) vs[k] = scale * (vs[k] - vt[k]);
    }
    if (!student_cfg) {
      store8<V, VEC>(grad + row, i, end, vs);
      continue;
    }
    float part[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) part[k] = (1.0f - student_guidance) * vs[k];
    store8<V, VEC>(grad + row, i, end, part);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) part[k] = student_guidance * vs[k];
    store8<V, VEC>(grad + cond_row, i, end, part);
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool valid_shape(int64_t B, int64_t N, int64_t chunk) {
  return B > 0 && B <= 65535 && N > 0 && chunk > 0 && chunk % OPD_CUDA_CHUNK_QUANTUM == 0 &&
         (N + chunk - 1) / chunk <= 0x7fffffff;
}

template <typename X, typename V>
cudaError_t launch_forward(const void* x, const void* vs, const void* vt, const void* noise, const float* coef,
                           void* x_next, float* partial, float* loss, const void* sample, float* sq_partial,
                           float* sq, int64_t B, int64_t N, int64_t chunk, bool scfg, float sg, bool tcfg, float tg,
                           cudaStream_t stream) {
  const int64_t num_chunks = (N + chunk - 1) / chunk;
  const dim3 grid(static_cast<unsigned>(num_chunks), static_cast<unsigned>(B));
  const bool vec = N % kPerThread == 0 && aligned16(x) && aligned16(vs) && aligned16(vt) && aligned16(noise) &&
                   aligned16(x_next) && aligned16(sample);
  const bool log_prob = sq != nullptr;
  auto kernel = log_prob ? (vec ? opd_step_fwd_kernel<X, V, true, true> : opd_step_fwd_kernel<X, V, true, false>)
                         : (vec ? opd_step_fwd_kernel<X, V, false, true> : opd_step_fwd_kernel<X, V, false, false>);
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const X*>(x), static_cast<const V*>(vs),
                                        static_cast<const V*>(vt), static_cast<const X*>(noise), coef,
                                        static_cast<X*>(x_next), partial, static_cast<const X*>(sample), sq_partial,
                                        B, N, chunk, num_chunks, scfg, sg, tcfg, tg);
  opd_step_loss_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(partial, coef, loss, sq_partial, sq, B,
                                                                          num_chunks);
  return cudaGetLastError();
}

template <typename X, typename V, bool LOG_PROB>
cudaError_t launch_backward(const void* vs, const void* vt, const float* coef, const float* grad_loss,
                            int64_t grad_loss_stride, void* grad, const void* x, const void* sample,
                            const float* grad_sq, int64_t B, int64_t N, int64_t chunk, bool scfg, float sg, bool tcfg,
                            float tg, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + chunk - 1) / chunk), static_cast<unsigned>(B));
  const bool vec =
      N % kPerThread == 0 && aligned16(vs) && aligned16(vt) && aligned16(grad) && aligned16(x) && aligned16(sample);
  auto kernel = vec ? opd_step_bwd_kernel<X, V, LOG_PROB, true> : opd_step_bwd_kernel<X, V, LOG_PROB, false>;
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const V*>(vs), static_cast<const V*>(vt), coef, grad_loss,
                                        grad_loss_stride, static_cast<V*>(grad), static_cast<const X*>(x),
                                        static_cast<const X*>(sample), grad_sq, B, N, chunk, scfg, sg, tcfg, tg);
  return cudaGetLastError();
}

// Calls f(V{}) with the storage type named by a dtype code; false for an unknown code.
template <typename F>
bool with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case OPD_CUDA_DTYPE_FLOAT32: f(float{}); return true;
    case OPD_CUDA_DTYPE_BFLOAT16: f(__nv_bfloat16{}); return true;
    case OPD_CUDA_DTYPE_FLOAT16: f(__half{}); return true;
    default: return false;
  }
}

}  // namespace

extern "C" int opd_step_cuda_forward(int x_dtype, int v_dtype, const void* x, const void* v_student,
                                     const void* v_teacher, const void* noise, const float* coef, void* x_next,
                                     float* partial, float* loss, const void* sample, float* sq_partial, float* sq,
                                     int64_t B, int64_t N, int64_t chunk, int student_cfg, float student_guidance,
                                     int teacher_cfg, float teacher_guidance, cudaStream_t stream) {
  if (!valid_shape(B, N, chunk) || (sq == nullptr) != (sq_partial == nullptr)) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  with_dtype(x_dtype, [&](auto x_tag) {
    with_dtype(v_dtype, [&](auto v_tag) {
      err = launch_forward<decltype(x_tag), decltype(v_tag)>(
          x, v_student, v_teacher, noise, coef, x_next, partial, loss, sample, sq_partial, sq, B, N, chunk,
          student_cfg != 0, student_guidance, teacher_cfg != 0, teacher_guidance, stream);
    });
  });
  return err;
}

extern "C" int opd_step_cuda_backward(int v_dtype, const void* v_student, const void* v_teacher, const float* coef,
                                      const float* grad_loss, int64_t grad_loss_stride, void* grad, int x_dtype,
                                      const void* x, const void* sample, const float* grad_sq, int64_t B, int64_t N,
                                      int64_t chunk, int student_cfg, float student_guidance, int teacher_cfg,
                                      float teacher_guidance, cudaStream_t stream) {
  if (!valid_shape(B, N, chunk)) return cudaErrorInvalidValue;
  if (grad_sq != nullptr && (x == nullptr || sample == nullptr)) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  with_dtype(v_dtype, [&](auto v_tag) {
    using V = decltype(v_tag);
    if (grad_sq == nullptr) {  // the plain step: x_dtype is not looked at
      err = launch_backward<V, V, false>(v_student, v_teacher, coef, grad_loss, grad_loss_stride, grad, nullptr,
                                         nullptr, nullptr, B, N, chunk, student_cfg != 0, student_guidance,
                                         teacher_cfg != 0, teacher_guidance, stream);
      return;
    }
    with_dtype(x_dtype, [&](auto x_tag) {
      err = launch_backward<decltype(x_tag), V, true>(v_student, v_teacher, coef, grad_loss, grad_loss_stride, grad,
                                                      x, sample, grad_sq, B, N, chunk, student_cfg != 0,
                                                      student_guidance, teacher_cfg != 0, teacher_guidance, stream);
    });
  });
  return err;
}
