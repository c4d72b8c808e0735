// Fused OPD step on CPU (torch extension opd_fast._C): the fast path for CPU training.
//
// Every tensor is seen as contiguous (rows, N) rows; coef is (4, B) float32 = x_coef, v_coef, sbar, w, computed by
// the host (opd_fast/fused.py) with opd_fast.reference so all backends share one scalar math. In fp32:
//   forward   x_next = x_coef x + v_coef v_s + sbar noise            (stored in x_next's dtype)
//             loss[b] = w[b] sum_n (v_s - v_t)^2                      (float32)
//   backward  dv_s = 2 w[b] g[b] (v_s - v_t)                          (stored in grad's dtype)
//   CFG       v = v_u + gw (v_c - v_u) from rows b and B + b of a (2B, N) tensor; dv_u = (1 - gw) dv, dv_c = gw dv
//
// Work is split into (sample, chunk) tasks run by at::parallel_for, which is torch's own OpenMP runtime (so
// torch.set_num_threads applies and no second thread pool competes with it; it only goes parallel because this
// file is compiled with -fopenmp). Each task converts tiles of kTile elements to fp32 buffers, which keeps the
// arithmetic loops free of dtype branches and lets -O3 vectorise them. The per-sample reduction is deterministic:
// kLanes independent accumulators per task (fixed order, vectorisable without -ffast-math), one partial per task,
// then the partials of a sample are summed serially in chunk order. Chunk boundaries come from the caller, not
// from the thread count, so the loss is bitwise reproducible on any number of threads.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kTile = 512;  // 5 fp32 tile buffers = 10 KiB: they stay in L1
constexpr int64_t kLanes = 16;

using LoadFn = void (*)(const char*, int64_t, float*);
using StoreFn = void (*)(const float*, int64_t, char*);

template <typename T>
void load_tile(const char* src, int64_t n, float* dst) {
  const T* p = reinterpret_cast<const T*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
}

template <typename T>
void store_tile(const float* src, int64_t n, char* dst) {
  T* p = reinterpret_cast<T*>(dst);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(src[i]);
}

// A tensor of (rows, N) elements read or written a tile at a time as fp32, whatever its dtype.
struct Rows {
  char* data;
  int64_t itemsize;
  LoadFn load = nullptr;
  StoreFn store = nullptr;

  explicit Rows(const at::Tensor& t) : data(static_cast<char*>(t.data_ptr())), itemsize(t.element_size()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "opd_step_cpu", [&] {
      load = &load_tile<scalar_t>;
      store = &store_tile<scalar_t>;
    });
  }
  void get(int64_t elem, int64_t n, float* out) const { load(data + elem * itemsize, n, out); }
  void put(int64_t elem, int64_t n, const float* in) const { store(in, n, data + elem * itemsize); }
};

// fp32 velocity tile starting at element i of sample b: v_u + gw (v_c - v_u) (rows b, B + b) or the plain row b.
void velocity_tile(const Rows& v, std::optional<double> guidance, int64_t B, int64_t N, int64_t b, int64_t i,
                   int64_t n, float* out, float* scratch) {
  v.get(b * N + i, n, out);
  if (!guidance) return;
  const float gw = static_cast<float>(*guidance);
  v.get((B + b) * N + i, n, scratch);
  for (int64_t j = 0; j < n; ++j) out[j] += gw * (scratch[j] - out[j]);
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

// Writes x_next (B, N), partial (B, cdiv(N, chunk)) float32 and loss (B,) float32. noise=None skips its read.
void opd_step_forward(const at::Tensor& x, const at::Tensor& v_student, const at::Tensor& v_teacher,
                      const std::optional<at::Tensor>& noise, const at::Tensor& coef,
                      std::optional<double> student_guidance, std::optional<double> teacher_guidance,
                      const at::Tensor& x_next, const at::Tensor& partial, const at::Tensor& loss, int64_t chunk) {
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

  const Rows xs(x), vs(v_student), vt(v_teacher), out(x_next);
  const std::optional<Rows> nz = noise ? std::optional<Rows>(Rows(*noise)) : std::nullopt;
  const float* c = coef.data_ptr<float>();
  float* part = partial.data_ptr<float>();

  at::parallel_for(0, B * num_chunks, 1, [&](int64_t task_begin, int64_t task_end) {
    alignas(64) float x_buf[kTile], vs_buf[kTile + kLanes], vt_buf[kTile + kLanes], n_buf[kTile], scratch[kTile];
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / num_chunks, begin = (task % num_chunks) * chunk, end = std::min(N, begin + chunk);
      const float x_coef = c[b], v_coef = c[B + b], sbar = c[2 * B + b];
      float acc[kLanes] = {};
      for (int64_t i = begin; i < end; i += kTile) {
        const int64_t n = std::min(kTile, end - i);
        xs.get(b * N + i, n, x_buf);
        velocity_tile(vs, student_guidance, B, N, b, i, n, vs_buf, scratch);
        velocity_tile(vt, teacher_guidance, B, N, b, i, n, vt_buf, scratch);
        for (int64_t j = 0; j < n; ++j) x_buf[j] = x_coef * x_buf[j] + v_coef * vs_buf[j];
        if (nz) {
          nz->get(b * N + i, n, n_buf);
          for (int64_t j = 0; j < n; ++j) x_buf[j] += sbar * n_buf[j];
        }
        out.put(b * N + i, n, x_buf);
        // zero the ragged end so whole kLanes groups can be summed; (0 - 0)^2 adds nothing
        const int64_t n_pad = cdiv(n, kLanes) * kLanes;
        for (int64_t j = n; j < n_pad; ++j) vs_buf[j] = vt_buf[j] = 0.0f;
        for (int64_t j = 0; j < n_pad; j += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l) {
            const float gap = vs_buf[j + l] - vt_buf[j + l];
            acc[l] += gap * gap;
          }
        }
      }
      float sum = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
      part[task] = sum;
    }
  });

  float* l = loss.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float sum = 0.0f;
    for (int64_t k = 0; k < num_chunks; ++k) sum += part[b * num_chunks + k];
    l[b] = c[3 * B + b] * sum;
  }
}

// Writes grad (shaped like v_student) = 2 w[b] g[b] (v_s - v_t), split (1 - gw, gw) over [uncond; cond] with CFG.
void opd_step_backward(const at::Tensor& v_student, const at::Tensor& v_teacher, const at::Tensor& coef,
                       const at::Tensor& grad_loss, std::optional<double> student_guidance,
                       std::optional<double> teacher_guidance, const at::Tensor& grad, int64_t chunk) {
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

  const Rows vs(v_student), vt(v_teacher), out(grad);
  const float* w = coef.data_ptr<float>() + 3 * B;
  const float* g = grad_loss.data_ptr<float>();
  const int64_t g_stride = grad_loss.stride(0);  // 0 when the gradient came from loss.sum(): no copy needed

  at::parallel_for(0, B * num_chunks, 1, [&](int64_t task_begin, int64_t task_end) {
    alignas(64) float vs_buf[kTile], vt_buf[kTile], scratch[kTile];
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / num_chunks, begin = (task % num_chunks) * chunk, end = std::min(N, begin + chunk);
      // g[b] folds into the per-sample scale: an all-ones g costs the same, no per-element multiply to skip
      const float scale = 2.0f * w[b] * g[b * g_stride];
      for (int64_t i = begin; i < end; i += kTile) {
        const int64_t n = std::min(kTile, end - i);
        velocity_tile(vs, student_guidance, B, N, b, i, n, vs_buf, scratch);
        velocity_tile(vt, teacher_guidance, B, N, b, i, n, vt_buf, scratch);
        for (int64_t j = 0; j < n; ++j) vs_buf[j] = scale * (vs_buf[j] - vt_buf[j]);
        if (!student_guidance) {
          out.put(b * N + i, n, vs_buf);
          continue;
        }
        const float gw = static_cast<float>(*student_guidance);
        for (int64_t j = 0; j < n; ++j) scratch[j] = (1.0f - gw) * vs_buf[j];
        out.put(b * N + i, n, scratch);
        for (int64_t j = 0; j < n; ++j) scratch[j] = gw * vs_buf[j];
        out.put((B + b) * N + i, n, scratch);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused OPD step (x_next, per-sample KL and its gradient) on CPU; see opd_fast/fused.py";
  m.def("forward", &opd_step_forward, "fused OPD step forward (writes x_next, partial, loss)", py::arg("x"),
        py::arg("v_student"), py::arg("v_teacher"), py::arg("noise"), py::arg("coef"), py::arg("student_guidance"),
        py::arg("teacher_guidance"), py::arg("x_next"), py::arg("partial"), py::arg("loss"), py::arg("chunk"));
  m.def("backward", &opd_step_backward, "fused OPD step backward (writes grad of v_student)", py::arg("v_student"),
        py::arg("v_teacher"), py::arg("coef"), py::arg("grad_loss"), py::arg("student_guidance"),
        py::arg("teacher_guidance"), py::arg("grad"), py::arg("chunk"));
}
