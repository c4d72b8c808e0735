// Fused OPD step on CPU (torch extension opd_fast._C): the fast path for CPU training.
//
// Every tensor is seen as contiguous (rows, N) rows; coef is (4, B) float32 = x_coef, v_coef, sbar, w, computed by
// the host (opd_fast/ops/opd_step/fused.py, naive.py's math) so all backends share one scalar math. In fp32:
//   forward   x_next = x_coef x + v_coef v_s + sbar noise            (stored in x_next's dtype)
//             loss[b] = w[b] sum_n (v_s - v_t)^2                      (float32)
//   backward  dv_s = 2 w[b] g[b] (v_s - v_t)                          (stored in grad's dtype)
//   CFG       v = v_u + gw (v_c - v_u) from rows b and B + b of a (2B, N) tensor; dv_u = (1 - gw) dv, dv_c = gw dv
//   log-prob  sq[b] = sum_n (x' - mu_S)^2, mu_S = x_coef x + v_coef v_s   (float32; the host makes it log p)
//             x' = the given sample, or x_next as stored (rounded to its dtype), so that a recompute against the
//             stored state sees the very residual the rollout saw (an on-policy ratio of exactly 1)
//             dv_s += gq[b] (-2 v_coef) (x' - mu_S)                     gq: the gradient of sq
//
// Work is split into (sample, chunk) tasks run by at::parallel_for, which is torch's own OpenMP runtime (so
// torch.set_num_threads applies and no second thread pool competes with it; it only goes parallel because this
// file is compiled with -fopenmp). Each task walks tiles of kTile elements as fp32 (fp32 tensors in place, others
// converted through small buffers), which keeps the arithmetic loops free of dtype branches and lets -O3 vectorise
// them. The per-sample reduction is deterministic: kLanes independent accumulators per task (fixed order,
// vectorisable without -ffast-math), one partial per task, then the partials of a sample are summed serially in
// chunk order. Chunk boundaries come from the caller, not from the thread count, so the loss is bitwise
// reproducible on any number of threads.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace {

constexpr int64_t kTile = 512;  // a handful of fp32 tile buffers (2 KiB each) stay in L1
constexpr int64_t kLanes = 16;

using LoadFn = void (*)(const char*, int64_t, float*);
using StoreFn = void (*)(const float*, int64_t, char*);

// Tile converters, compiled twice: for the baseline x86-64 ISA and for AVX2 (picked at run time), since converting
// bf16 / fp16 with SSE2 shuffles is what limits the reduced-precision paths. The default-target c10 conversions
// inline into the AVX2 copies and vectorise at that width.
#if defined(__x86_64__) && defined(__GNUC__)
#define OPD_HAVE_AVX2_CLONES 1
#define OPD_AVX2 __attribute__((target("avx2,fma")))
#else
#define OPD_HAVE_AVX2_CLONES 0
#define OPD_AVX2
#endif

#define OPD_TILE_CONVERTERS(SUFFIX, ATTR)                                    \
  template <typename T>                                                      \
  ATTR void load_tile##SUFFIX(const char* src, int64_t n, float* dst) {      \
    const T* p = reinterpret_cast<const T*>(src);                            \
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);       \
  }                                                                          \
  template <typename T>                                                      \
  ATTR void store_tile##SUFFIX(const float* src, int64_t n, char* dst) {     \
    T* p = reinterpret_cast<T*>(dst);                                        \
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(src[i]);          \
  }
OPD_TILE_CONVERTERS(_baseline, )
#if OPD_HAVE_AVX2_CLONES
OPD_TILE_CONVERTERS(_avx2, OPD_AVX2)
#endif

bool cpu_has_avx2() {
#if OPD_HAVE_AVX2_CLONES
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// On where the CPU has AVX2; tests switch it off (simd_avx2(False)) to cover the baseline converters too.
std::atomic<bool>& avx2_enabled() {
  static std::atomic<bool> on{cpu_has_avx2()};
  return on;
}

// A tensor of (rows, N) elements read or written a tile at a time as fp32, whatever its dtype. fp32 tensors are
// read and written in place (no copy); other dtypes go through a caller's fp32 buffer.
struct Rows {
  char* data;
  int64_t itemsize;
  bool is_float;
  LoadFn load = nullptr;
  StoreFn store = nullptr;

  explicit Rows(const at::Tensor& t)
      : data(static_cast<char*>(t.data_ptr())),
        itemsize(t.element_size()),
        is_float(t.scalar_type() == at::kFloat) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "opd_step_cpu", [&] {
      load = &load_tile_baseline<scalar_t>;
      store = &store_tile_baseline<scalar_t>;
#if OPD_HAVE_AVX2_CLONES
      if (avx2_enabled()) {
        load = &load_tile_avx2<scalar_t>;
        store = &store_tile_avx2<scalar_t>;
      }
#endif
    });
  }
  // fp32 values of elements [elem, elem + n): the tensor's own memory when it is fp32, else converted into buf.
  const float* get(int64_t elem, int64_t n, float* buf) const {
    if (is_float) return reinterpret_cast<const float*>(data) + elem;
    load(data + elem * itemsize, n, buf);
    return buf;
  }
  // Where to compute fp32 results for [elem, ...): straight into the tensor when it is fp32, else into buf.
  float* out(int64_t elem, float* buf) const { return is_float ? reinterpret_cast<float*>(data) + elem : buf; }
  // Stores results computed in out()'s buffer (nothing to do when they were written in place).
  void put(int64_t elem, int64_t n, const float* values) const {
    if (!is_float) store(values, n, data + elem * itemsize);
  }
};

// fp32 velocity tile starting at element i of sample b: v_u + gw (v_c - v_u) (rows b, B + b) or the plain row b.
const float* velocity_tile(const Rows& v, std::optional<double> guidance, int64_t B, int64_t N, int64_t b, int64_t i,
                           int64_t n, float* buf, float* scratch) {
  const float* uncond = v.get(b * N + i, n, buf);
  if (!guidance) return uncond;
  const float gw = static_cast<float>(*guidance);
  const float* cond = v.get((B + b) * N + i, n, scratch);
  for (int64_t j = 0; j < n; ++j) buf[j] = uncond[j] + gw * (cond[j] - uncond[j]);
  return buf;
}

// acc[l] += (a - b)^2 over kLanes-wide groups, then the ragged tail: a fixed order whatever the thread count. The
// lanes are summed in a local copy (acc_out could alias a and b as far as the compiler knows) and the function is
// inlined into each caller: called from three places, gcc kept it out of line with a scalar loop, and the forward
// ran 2x slower (measured, bench/RESULTS.md, 2026-12-02).
inline __attribute__((always_inline)) void accumulate_squared_gap(const float* a, const float* b, int64_t n,
                                                                  float* acc_out) {
  float acc[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) acc[l] = acc_out[l];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float gap = a[j + l] - b[j + l];
      acc[l] += gap * gap;
    }
  }
  for (int64_t l = 0; j < n; ++j, ++l) {
    const float gap = a[j] - b[j];
    acc[l] += gap * gap;
  }
  for (int64_t l = 0; l < kLanes; ++l) acc_out[l] = acc[l];
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t N) {
  TORCH_CHECK(t.device().is_cpu(), "opd_fast._C: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "opd_fast._C: ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == N, "opd_fast._C: ", name, " must be (", rows, ", ",
              N, "), got ", t.sizes());
}

void check_coef(const at::Tensor& coef, int64_t B) {
  TORCH_CHECK(coef.device().is_cpu() && coef.is_contiguous() && coef.scalar_type() == at::kFloat &&
                  coef.dim() == 2 && coef.size(0) == 4 && coef.size(1) == B,
              "opd_fast._C: coef must be a contiguous (4, ", B, ") float32 CPU tensor, got ", coef.sizes());
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

// Writes x_next (B, N), partial (B, cdiv(N, chunk)) float32 and loss (B,) float32. noise=None skips its read. With
// sq (B,) and sq_partial (like partial) given, also the log-density's sum of squares against sample (B, N), or
// against x_next as stored when sample is None.
void opd_step_forward(const at::Tensor& x, const at::Tensor& v_student, const at::Tensor& v_teacher,
                      const std::optional<at::Tensor>& noise, const at::Tensor& coef,
                      std::optional<double> student_guidance, std::optional<double> teacher_guidance,
                      const at::Tensor& x_next, const at::Tensor& partial, const at::Tensor& loss, int64_t chunk,
                      const std::optional<at::Tensor>& sq, const std::optional<at::Tensor>& sq_partial,
                      const std::optional<at::Tensor>& sample) {
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(chunk > 0, "opd_fast._C: chunk must be positive");
  const int64_t num_chunks = cdiv(N, chunk);
  check_rows(x, "x", B, N);
  check_rows(v_student, "v_student", student_guidance ? 2 * B : B, N);
  check_rows(v_teacher, "v_teacher", teacher_guidance ? 2 * B : B, N);
  if (noise) check_rows(*noise, "noise", B, N);
  check_rows(x_next, "x_next", B, N);
  check_rows(partial, "partial", B, num_chunks);
  check_coef(coef, B);
  TORCH_CHECK(partial.scalar_type() == at::kFloat && loss.scalar_type() == at::kFloat && loss.is_contiguous() &&
                  loss.numel() == B,
              "opd_fast._C: partial and loss must be float32, loss (B,) contiguous");
  const bool log_prob = sq.has_value();
  TORCH_CHECK(log_prob == sq_partial.has_value(), "opd_fast._C: sq and sq_partial are given together");
  TORCH_CHECK(log_prob || !sample, "opd_fast._C: sample is read only for the log-density (pass sq, sq_partial)");
  if (log_prob) {
    check_rows(*sq_partial, "sq_partial", B, num_chunks);
    TORCH_CHECK(sq_partial->scalar_type() == at::kFloat && sq->scalar_type() == at::kFloat && sq->is_contiguous() &&
                    sq->numel() == B,
                "opd_fast._C: sq_partial and sq must be float32, sq (B,) contiguous");
    if (sample) check_rows(*sample, "sample", B, N);
  }

  const Rows xs(x), vs(v_student), vt(v_teacher), out(x_next);
  const std::optional<Rows> nz = noise ? std::optional<Rows>(Rows(*noise)) : std::nullopt;
  // x' of the log-density: the given sample, or x_next re-read as stored (in place when fp32: y itself)
  const Rows target_rows(sample ? *sample : x_next);
  const float* c = coef.data_ptr<float>();
  float* part = partial.data_ptr<float>();
  float* sq_part = log_prob ? sq_partial->data_ptr<float>() : nullptr;

  // One body, compiled with and without the log-density, so the plain step keeps its exact loop.
  auto run = [&](auto log_prob_tag) {
    constexpr bool kLogProb = decltype(log_prob_tag)::value;
    at::parallel_for(0, B * num_chunks, 1, [&](int64_t task_begin, int64_t task_end) {
      alignas(64) float x_buf[kTile], vs_buf[kTile], vt_buf[kTile], n_buf[kTile], y_buf[kTile], scratch[kTile];
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t b = task / num_chunks, begin = (task % num_chunks) * chunk, end = std::min(N, begin + chunk);
        const float x_coef = c[b], v_coef = c[B + b], sbar = c[2 * B + b];
        float acc[kLanes] = {};
        float acc_sq[kLanes] = {};
        for (int64_t i = begin; i < end; i += kTile) {
          const int64_t n = std::min(kTile, end - i), elem = b * N + i;
          const float* x_in = xs.get(elem, n, x_buf);
          const float* v_s = velocity_tile(vs, student_guidance, B, N, b, i, n, vs_buf, scratch);
          const float* v_t = velocity_tile(vt, teacher_guidance, B, N, b, i, n, vt_buf, scratch);
          float* y = out.out(elem, y_buf);
          float* mean = scratch;  // log-density only; free again once both velocity tiles are read
          if (nz) {
            const float* e = nz->get(elem, n, n_buf);
            if constexpr (kLogProb) {
              for (int64_t j = 0; j < n; ++j) {
                mean[j] = x_coef * x_in[j] + v_coef * v_s[j];
                y[j] = mean[j] + sbar * e[j];  // the plain step's sum, in its order
              }
            } else {
              for (int64_t j = 0; j < n; ++j) y[j] = x_coef * x_in[j] + v_coef * v_s[j] + sbar * e[j];
            }
          } else {
            for (int64_t j = 0; j < n; ++j) y[j] = x_coef * x_in[j] + v_coef * v_s[j];
            if constexpr (kLogProb) mean = y;  // x_next is the mean (the residual is its rounding, or x' - x_next)
          }
          out.put(elem, n, y);
          accumulate_squared_gap(v_s, v_t, n, acc);
          if constexpr (kLogProb) {
            // after put: x_next as stored; into n_buf, free again once the noise is added
            const float* target = target_rows.get(elem, n, n_buf);
            accumulate_squared_gap(target, mean, n, acc_sq);
          }
        }
        float sum = 0.0f;
        for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
        part[task] = sum;
        if constexpr (kLogProb) {
          float sum_sq = 0.0f;
          for (int64_t l = 0; l < kLanes; ++l) sum_sq += acc_sq[l];
          sq_part[task] = sum_sq;
        }
      }
    });
  };
  if (log_prob) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }

  float* l = loss.data_ptr<float>();
  float* s = log_prob ? sq->data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    float sum = 0.0f, sum_sq = 0.0f;
    for (int64_t k = 0; k < num_chunks; ++k) sum += part[b * num_chunks + k];
    l[b] = c[3 * B + b] * sum;
    if (!log_prob) continue;
    for (int64_t k = 0; k < num_chunks; ++k) sum_sq += sq_part[b * num_chunks + k];
    s[b] = sum_sq;
  }
}

// Writes grad (shaped like v_student) = 2 w[b] g[b] (v_s - v_t), split (1 - gw, gw) over [uncond; cond] with CFG.
// With grad_sq (B,) float32 given, plus grad_sq[b] (-2 v_coef) (sample - mu_S) for the log-density (x, sample (B, N)).
void opd_step_backward(const at::Tensor& v_student, const at::Tensor& v_teacher, const at::Tensor& coef,
                       const at::Tensor& grad_loss, std::optional<double> student_guidance,
                       std::optional<double> teacher_guidance, const at::Tensor& grad, int64_t chunk,
                       const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& sample,
                       const std::optional<at::Tensor>& grad_sq) {
  const int64_t B = coef.size(1), N = v_student.size(1);
  TORCH_CHECK(chunk > 0, "opd_fast._C: chunk must be positive");
  const int64_t num_chunks = cdiv(N, chunk);
  check_coef(coef, B);
  check_rows(v_student, "v_student", student_guidance ? 2 * B : B, N);
  check_rows(v_teacher, "v_teacher", teacher_guidance ? 2 * B : B, N);
  check_rows(grad, "grad", student_guidance ? 2 * B : B, N);
  TORCH_CHECK(grad_loss.device().is_cpu() && grad_loss.scalar_type() == at::kFloat && grad_loss.dim() == 1 &&
                  grad_loss.size(0) == B,
              "opd_fast._C: grad_loss must be a (B,) float32 CPU tensor");
  const bool log_prob = grad_sq.has_value();
  TORCH_CHECK(log_prob == x.has_value() && log_prob == sample.has_value(),
              "opd_fast._C: x, sample and grad_sq are given together (the log-density's gradient)");
  if (log_prob) {
    check_rows(*x, "x", B, N);
    check_rows(*sample, "sample", B, N);
    TORCH_CHECK(grad_sq->device().is_cpu() && grad_sq->scalar_type() == at::kFloat && grad_sq->is_contiguous() &&
                    grad_sq->numel() == B,
                "opd_fast._C: grad_sq must be a (B,) contiguous float32 CPU tensor");
  }

  const Rows vs(v_student), vt(v_teacher), out(grad);
  const std::optional<Rows> xs = log_prob ? std::optional<Rows>(Rows(*x)) : std::nullopt;
  const std::optional<Rows> ts = log_prob ? std::optional<Rows>(Rows(*sample)) : std::nullopt;
  const float* c = coef.data_ptr<float>();
  const float* w = c + 3 * B;
  const float* g = grad_loss.data_ptr<float>();
  const int64_t g_stride = grad_loss.stride(0);  // 0 when the gradient came from loss.sum(): no copy needed
  const float* gq = log_prob ? grad_sq->data_ptr<float>() : nullptr;

  // One body, compiled with and without the log-density, so the plain step keeps its exact loop.
  auto run = [&](auto log_prob_tag) {
    constexpr bool kLogProb = decltype(log_prob_tag)::value;
    at::parallel_for(0, B * num_chunks, 1, [&](int64_t task_begin, int64_t task_end) {
      alignas(64) float vs_buf[kTile], vt_buf[kTile], y_buf[kTile], scratch[kTile];
      alignas(64) float x_buf[kTile], t_buf[kTile], d_buf[kTile];  // log-density only
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t b = task / num_chunks, begin = (task % num_chunks) * chunk, end = std::min(N, begin + chunk);
        // g[b] folds into the per-sample scale: an all-ones g costs the same, no per-element multiply to skip
        const float scale = 2.0f * w[b] * g[b * g_stride];
        const float gw = static_cast<float>(student_guidance.value_or(0.0));
        for (int64_t i = begin; i < end; i += kTile) {
          const int64_t n = std::min(kTile, end - i);
          const float* v_s = velocity_tile(vs, student_guidance, B, N, b, i, n, vs_buf, scratch);
          const float* v_t = velocity_tile(vt, teacher_guidance, B, N, b, i, n, vt_buf, scratch);
          // without CFG one row gets scale * gap; with it [uncond; cond] get (1 - gw) and gw times that
          const int64_t rows[2] = {b * N + i, (B + b) * N + i};
          if constexpr (kLogProb) {
            // d = scale (v_s - v_t) + gq[b] (-2 v_coef) (x' - mu_S), then split over the rows as above
            const float x_coef = c[b], v_coef = c[B + b], k_lp = -2.0f * v_coef * gq[b];
            const float* x_in = xs->get(b * N + i, n, x_buf);
            const float* target = ts->get(b * N + i, n, t_buf);
            // without CFG straight into the output row, with it into d_buf and then split over the two rows
            float* d = student_guidance ? d_buf : out.out(rows[0], y_buf);
            for (int64_t j = 0; j < n; ++j) {
              d[j] = scale * (v_s[j] - v_t[j]) + k_lp * (target[j] - (x_coef * x_in[j] + v_coef * v_s[j]));
            }
            if (!student_guidance) {
              out.put(rows[0], n, d);
              continue;
            }
            const float row_factor[2] = {1.0f - gw, gw};
            for (int r = 0; r < 2; ++r) {
              float* y = out.out(rows[r], y_buf);
              for (int64_t j = 0; j < n; ++j) y[j] = row_factor[r] * d_buf[j];
              out.put(rows[r], n, y);
            }
          } else {
            const float row_scale[2] = {student_guidance ? (1.0f - gw) * scale : scale, gw * scale};
            for (int r = 0; r < (student_guidance ? 2 : 1); ++r) {
              float* y = out.out(rows[r], y_buf);
              const float k = row_scale[r];
              for (int64_t j = 0; j < n; ++j) y[j] = k * (v_s[j] - v_t[j]);
              out.put(rows[r], n, y);
            }
          }
        }
      }
    });
  };
  if (log_prob) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

// Whether the AVX2 tile converters are in use; `enable` switches them (on only where the CPU has AVX2).
bool simd_avx2(std::optional<bool> enable) {
  if (enable) avx2_enabled() = *enable && cpu_has_avx2();
  return avx2_enabled();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused OPD step (x_next, per-sample KL and its gradient) on CPU; see opd_fast/ops/opd_step/fused.py";
  m.def("forward", &opd_step_forward, "fused OPD step forward (writes x_next, partial, loss; sq for the log-density)",
        py::arg("x"), py::arg("v_student"), py::arg("v_teacher"), py::arg("noise"), py::arg("coef"),
        py::arg("student_guidance"), py::arg("teacher_guidance"), py::arg("x_next"), py::arg("partial"),
        py::arg("loss"), py::arg("chunk"), py::kw_only(), py::arg("sq") = py::none(),
        py::arg("sq_partial") = py::none(), py::arg("sample") = py::none());
  m.def("backward", &opd_step_backward, "fused OPD step backward (writes grad of v_student)", py::arg("v_student"),
        py::arg("v_teacher"), py::arg("coef"), py::arg("grad_loss"), py::arg("student_guidance"),
        py::arg("teacher_guidance"), py::arg("grad"), py::arg("chunk"), py::kw_only(), py::arg("x") = py::none(),
        py::arg("sample") = py::none(), py::arg("grad_sq") = py::none());
  m.attr("HAS_LOG_PROB") = true;  // fused.py refuses log_prob on a _C built before it (a stale in-place build)
  m.def("simd_avx2", &simd_avx2, "AVX2 converters in use (pass a bool to switch them; for tests)",
        py::arg("enable") = py::none());
}
