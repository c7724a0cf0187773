// bind_torch.cpp: the PyTorch binding of the taca kernels (torch.ops.taca.fwd / bwd).
//
// Modeled on pytorch/extension-cpp: the schemas live in TORCH_LIBRARY(taca), one
// TORCH_LIBRARY_IMPL per device, and an empty PyInit__C so `import taca._C` loads this
// library; taca/ops.py adds register_fake and register_autograd. Tensors arrive as
// (B, N, H, D) views with any b/n/h strides (ops.py transposes "bhnd" without copying);
// outputs take the layout of the matching input (alloc_like) so the fake impls in ops.py
// reproduce their strides exactly.
//
// CPU: float32/float64 straight to taca_fwd_cpu/taca_bwd_cpu; bfloat16/float16 are upcast
// to float32 here and the results cast back. CUDA (built with -DTACA_WITH_CUDA): float16 and
// bfloat16 on the current stream, deterministic backward with a torch-allocated workspace.
// Build: pip install --no-build-isolation -e . (setup.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef TACA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>

#include "taca.h"

extern "C" {
// Importing taca._C only has to load this library so the TORCH_LIBRARY blocks run.
PyObject *PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, NULL,
                                          NULL, NULL, NULL, NULL};
  PyObject *m = PyModule_Create(&module_def);
  if (m == NULL) return NULL;
#ifdef TACA_WITH_CUDA
  const int has_cuda = 1;
#else
  const int has_cuda = 0;
#endif
  PyObject *flag = PyBool_FromLong(has_cuda);
  if (PyModule_AddObject(m, "has_cuda", flag) < 0) {
    Py_XDECREF(flag);
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
}

namespace taca_torch {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

bool has_cuda() {
#ifdef TACA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The layout every output takes: dense, its b/n/h dims in the order of t's strides
// (largest first, ties by position), D innermost. For a dense input that is t's own layout
// (no copies for diffusers' views); unlike empty_like it never depends on the strides of
// size-1 dims or on memory-format heuristics. ops.py's fake impls mirror this function.
at::Tensor alloc_like(const at::Tensor &t, at::ScalarType dtype) {
  std::array<int64_t, 4> perm = {0, 1, 2, 3};
  std::stable_sort(perm.begin(), perm.begin() + 3,
                   [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  std::array<int64_t, 4> sizes, inv;
  for (int64_t i = 0; i < 4; ++i) {
    sizes[i] = t.size(perm[i]);
    inv[perm[i]] = i;
  }
  return at::empty(sizes, t.options().dtype(dtype)).permute(inv);
}

// Inputs only: the kernels need a unit stride on D; anything else is copied.
at::Tensor unit_last_stride(const at::Tensor &t) {
  return (t.size(-1) > 1 && t.stride(-1) != 1) ? t.contiguous() : t;
}

taca_strides strides_of(const at::Tensor &t) {
  return taca_strides{t.stride(0), t.stride(1), t.stride(2)};
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_bnhd(const at::Tensor &t, const char *name, const at::Tensor &q) {
  TORCH_CHECK_VALUE(t.dim() == 4, "taca: ", name, " must be a 4-d (B, N, H, D) tensor, got ",
                    t.dim(), " dimensions");
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), "taca: ", name, " has shape ", t.sizes(),
                    " but q has shape ", q.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "taca: ", name, " has dtype ",
                   t.scalar_type(), " but q has dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "taca: ", name, " is on ", t.device(),
                    " but q is on ", q.device());
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK_VALUE(t.stride(i) >= 0, "taca: ", name, " has a negative stride");
}

void check_common(const at::Tensor &q, const at::Tensor &gamma, double gamma_reverse,
                  double scale, int64_t text_begin, int64_t text_end) {
  TORCH_CHECK_VALUE(q.dim() == 4, "taca: q must be a 4-d (B, N, H, D) tensor, got ", q.dim(),
                    " dimensions");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()),
                   "taca: q must be floating point, got ", q.scalar_type());
  const int64_t N = q.size(1), D = q.size(3);
  TORCH_CHECK_VALUE(D >= 1 && D <= TACA_MAX_HEAD_DIM, "taca: head dim D=", D,
                    " must be in [1, ", TACA_MAX_HEAD_DIM, "]");
  TORCH_CHECK_VALUE(0 <= text_begin && text_begin <= text_end && text_end <= N,
                    "taca: text range [", text_begin, ", ", text_end,
                    ") must satisfy 0 <= text_begin <= text_end <= N=", N);
  TORCH_CHECK_VALUE(std::isfinite(gamma_reverse) && gamma_reverse > 0.0,
                    "taca: gamma_reverse=", gamma_reverse, " must be finite and > 0");
  TORCH_CHECK_VALUE(std::isfinite(scale), "taca: scale=", scale, " must be finite");
  TORCH_CHECK_VALUE(gamma.dim() == 1 && gamma.size(0) == q.size(0), "taca: gamma must be a (",
                    q.size(0), ",) tensor, got shape ", gamma.sizes());
  TORCH_CHECK_TYPE(gamma.scalar_type() == at::kFloat, "taca: gamma must be float32, got ",
                   gamma.scalar_type());
  TORCH_CHECK_VALUE(gamma.device() == q.device(), "taca: gamma is on ", gamma.device(),
                    " but q is on ", q.device());
}

void check_lse(const at::Tensor &lse, const at::Tensor &q) {
  const at::IntArrayRef s = q.sizes();
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == s[0] && lse.size(1) == s[2] &&
                        lse.size(2) == s[1],
                    "taca: lse must have shape (B, H, N) = (", s[0], ", ", s[2], ", ", s[1],
                    "), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_type(q.scalar_type()), "taca: lse must be ",
                   acc_type(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ",
                   lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "taca: lse is on ", lse.device(),
                    " but q is on ", q.device());
}

void check_status(int st, const char *what) {
  if (st == TACA_OK) return;
#ifdef TACA_WITH_CUDA
  if (st == TACA_ERR_CUDA) TORCH_CHECK(false, "taca: ", what, ": ", taca_last_cuda_error());
#endif
  if (st == TACA_ERR_DTYPE) TORCH_CHECK_TYPE(false, "taca: ", what, ": ", taca_status_string(st));
  if (st == TACA_ERR_UNSUPPORTED || st == TACA_ERR_ALLOC || st == TACA_ERR_WORKSPACE ||
      st == TACA_ERR_CUDA)
    TORCH_CHECK(false, "taca: ", what, ": ", taca_status_string(st), " (status ", st, ")");
  TORCH_CHECK_VALUE(false, "taca: ", what, ": ", taca_status_string(st), " (status ", st, ")");
}

taca_dtype taca_dtype_of(at::ScalarType t) {
  switch (t) {
  case at::kFloat: return TACA_F32;
  case at::kDouble: return TACA_F64;
  case at::kHalf: return TACA_F16;
  case at::kBFloat16: return TACA_BF16;
  default: TORCH_CHECK_TYPE(false, "taca: unsupported dtype ", t);
  }
}

// The fields taca_fwd_params and taca_bwd_params share (same names in both structs).
template <typename P>
void fill_shared(P &p, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                 const at::Tensor &out, const at::Tensor &lse, const at::Tensor &gamma,
                 double gamma_reverse, double scale, int64_t text_begin, int64_t text_end) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(k);
  p.v_stride = strides_of(v);
  p.out_stride = strides_of(out);
  p.batch = q.size(0);
  p.seqlen = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.text_begin = text_begin;
  p.text_end = text_end;
  p.gamma = gamma.data_ptr<float>();
  p.gamma_reverse = static_cast<float>(gamma_reverse);
  p.scale = static_cast<float>(scale);
  p.dtype = taca_dtype_of(q.scalar_type());
  p.num_threads = at::get_num_threads();
}

taca_fwd_params fwd_params(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                           const at::Tensor &out, const at::Tensor &lse,
                           const at::Tensor &text_mass, const at::Tensor &gamma,
                           double gamma_reverse, double scale, int64_t text_begin,
                           int64_t text_end) {
  taca_fwd_params p = {};
  fill_shared(p, q, k, v, out, lse, gamma, gamma_reverse, scale, text_begin, text_end);
  p.text_mass = text_mass.numel() ? text_mass.data_ptr() : nullptr;
  return p;
}

taca_bwd_params bwd_params(const at::Tensor &dout, const at::Tensor &q, const at::Tensor &k,
                           const at::Tensor &v, const at::Tensor &out, const at::Tensor &lse,
                           const at::Tensor &dq, const at::Tensor &dk, const at::Tensor &dv,
                           const at::Tensor &gamma, double gamma_reverse, double scale,
                           int64_t text_begin, int64_t text_end) {
  taca_bwd_params p = {};
  fill_shared(p, q, k, v, out, lse, gamma, gamma_reverse, scale, text_begin, text_end);
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dout_stride = strides_of(dout);
  p.dq_stride = strides_of(dq);
  p.dk_stride = strides_of(dk);
  p.dv_stride = strides_of(dv);
  p.deterministic = 1;
  return p;
}

// ---- CPU ----

// Host gamma values are checked here, inside the op, so the check also runs under
// torch.compile (the CUDA path cannot read them without a sync).
at::Tensor host_gamma(const at::Tensor &gamma) {
  at::Tensor g = gamma.contiguous();
  const float *gp = g.data_ptr<float>();
  for (int64_t i = 0; i < g.numel(); ++i)
    TORCH_CHECK_VALUE(std::isfinite(gp[i]) && gp[i] > 0.0f, "taca: gamma[", i, "]=", gp[i],
                      " must be finite and > 0");
  return g;
}

bool cpu_native(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

Tensor3 fwd_cpu(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                const at::Tensor &gamma, double gamma_reverse, double scale, int64_t text_begin,
                int64_t text_end, bool return_text_mass) {
  check_common(q_in, gamma, gamma_reverse, scale, text_begin, text_end);
  check_bnhd(q_in, "q", q_in);
  check_bnhd(k_in, "k", q_in);
  check_bnhd(v_in, "v", q_in);
  TORCH_CHECK_VALUE(q_in.device().is_cpu(), "taca: fwd CPU impl got q on ", q_in.device());
  const int64_t B = q_in.size(0), N = q_in.size(1), H = q_in.size(2);
  const at::ScalarType dt = q_in.scalar_type(), acc = acc_type(dt);
  at::Tensor out = alloc_like(q_in, dt);
  at::Tensor lse = at::empty({B, H, N}, q_in.options().dtype(acc));
  at::Tensor tm = return_text_mass ? at::empty({B, H, N}, q_in.options().dtype(acc))
                                   : at::empty({0}, q_in.options().dtype(acc));
  if (B * N * H == 0) return {out, lse, tm};
  const at::Tensor g = host_gamma(gamma);

  const bool native = cpu_native(dt);
  at::Tensor q = unit_last_stride(native ? q_in : q_in.to(at::kFloat));
  at::Tensor k = unit_last_stride(native ? k_in : k_in.to(at::kFloat));
  at::Tensor v = unit_last_stride(native ? v_in : v_in.to(at::kFloat));
  at::Tensor o = native ? out : alloc_like(q_in, at::kFloat);
  taca_fwd_params p = fwd_params(q, k, v, o, lse, tm, g, gamma_reverse, scale, text_begin,
                                 text_end);
  check_status(taca_fwd_cpu(&p), "forward (CPU)");
  if (!native) out.copy_(o);
  return {out, lse, tm};
}

Tensor3 bwd_cpu(const at::Tensor &dout_in, const at::Tensor &q_in, const at::Tensor &k_in,
                const at::Tensor &v_in, const at::Tensor &out_in, const at::Tensor &lse_in,
                const at::Tensor &gamma, double gamma_reverse, double scale, int64_t text_begin,
                int64_t text_end) {
  check_common(q_in, gamma, gamma_reverse, scale, text_begin, text_end);
  check_bnhd(q_in, "q", q_in);
  check_bnhd(k_in, "k", q_in);
  check_bnhd(v_in, "v", q_in);
  check_bnhd(out_in, "out", q_in);
  check_bnhd(dout_in, "dout", q_in);
  check_lse(lse_in, q_in);
  TORCH_CHECK_VALUE(q_in.device().is_cpu(), "taca: bwd CPU impl got q on ", q_in.device());
  const at::ScalarType dt = q_in.scalar_type();
  at::Tensor dq = alloc_like(q_in, dt), dk = alloc_like(k_in, dt), dv = alloc_like(v_in, dt);
  if (q_in.size(0) * q_in.size(1) * q_in.size(2) == 0) return {dq, dk, dv};
  const at::Tensor g = host_gamma(gamma);

  const bool native = cpu_native(dt);
  auto prep = [&](const at::Tensor &t) {
    return unit_last_stride(native ? t : t.to(at::kFloat));
  };
  at::Tensor q = prep(q_in), k = prep(k_in), v = prep(v_in), out = prep(out_in),
             dout = prep(dout_in);
  at::Tensor lse = lse_in.contiguous();
  at::Tensor dq_k = native ? dq : alloc_like(q_in, at::kFloat);
  at::Tensor dk_k = native ? dk : alloc_like(k_in, at::kFloat);
  at::Tensor dv_k = native ? dv : alloc_like(v_in, at::kFloat);
  taca_bwd_params p = bwd_params(dout, q, k, v, out, lse, dq_k, dk_k, dv_k, g, gamma_reverse,
                                 scale, text_begin, text_end);
  check_status(taca_bwd_cpu(&p), "backward (CPU)");
  if (!native) {
    dq.copy_(dq_k);
    dk.copy_(dk_k);
    dv.copy_(dv_k);
  }
  return {dq, dk, dv};
}

// ---- CUDA ----
#ifdef TACA_WITH_CUDA

void check_cuda_dtype(const at::Tensor &q) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "taca: the CUDA kernel takes float16 or bfloat16 q, k, v, got ",
                   q.scalar_type(), " (use backend=\"sdpa\" for other dtypes)");
}

Tensor3 fwd_cuda(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                 const at::Tensor &gamma_in, double gamma_reverse, double scale,
                 int64_t text_begin, int64_t text_end, bool return_text_mass) {
  check_common(q_in, gamma_in, gamma_reverse, scale, text_begin, text_end);
  check_bnhd(q_in, "q", q_in);
  check_bnhd(k_in, "k", q_in);
  check_bnhd(v_in, "v", q_in);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "taca: fwd CUDA impl got q on ", q_in.device());
  check_cuda_dtype(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), N = q_in.size(1), H = q_in.size(2);
  at::Tensor out = alloc_like(q_in, q_in.scalar_type());
  at::Tensor lse = at::empty({B, H, N}, q_in.options().dtype(at::kFloat));
  at::Tensor tm = return_text_mass ? at::empty({B, H, N}, q_in.options().dtype(at::kFloat))
                                   : at::empty({0}, q_in.options().dtype(at::kFloat));
  if (B * N * H == 0) return {out, lse, tm};
  at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor gamma = gamma_in.contiguous();
  taca_fwd_params p = fwd_params(q, k, v, out, lse, tm, gamma, gamma_reverse, scale, text_begin,
                                 text_end);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_status(taca_fwd_cuda(&p, static_cast<void *>(stream)), "forward (CUDA)");
  return {out, lse, tm};
}

Tensor3 bwd_cuda(const at::Tensor &dout_in, const at::Tensor &q_in, const at::Tensor &k_in,
                 const at::Tensor &v_in, const at::Tensor &out_in, const at::Tensor &lse_in,
                 const at::Tensor &gamma_in, double gamma_reverse, double scale,
                 int64_t text_begin, int64_t text_end) {
  check_common(q_in, gamma_in, gamma_reverse, scale, text_begin, text_end);
  check_bnhd(q_in, "q", q_in);
  check_bnhd(k_in, "k", q_in);
  check_bnhd(v_in, "v", q_in);
  check_bnhd(out_in, "out", q_in);
  check_bnhd(dout_in, "dout", q_in);
  check_lse(lse_in, q_in);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "taca: bwd CUDA impl got q on ", q_in.device());
  check_cuda_dtype(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::ScalarType dt = q_in.scalar_type();
  at::Tensor dq = alloc_like(q_in, dt), dk = alloc_like(k_in, dt), dv = alloc_like(v_in, dt);
  if (q_in.size(0) * q_in.size(1) * q_in.size(2) == 0) return {dq, dk, dv};
  at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in),
             out = unit_last_stride(out_in), dout = unit_last_stride(dout_in);
  at::Tensor lse = lse_in.contiguous(), gamma = gamma_in.contiguous();
  taca_bwd_params p = bwd_params(dout, q, k, v, out, lse, dq, dk, dv, gamma, gamma_reverse,
                                 scale, text_begin, text_end);
  const size_t ws_bytes = taca_bwd_workspace_size(&p);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, q_in.options().dtype(at::kByte));
  p.workspace = ws_bytes ? workspace.data_ptr() : nullptr;
  p.workspace_bytes = ws_bytes;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_status(taca_bwd_cuda(&p, static_cast<void *>(stream)), "backward (CUDA)");
  return {dq, dk, dv};
}

#endif  // TACA_WITH_CUDA

}  // namespace taca_torch

TORCH_LIBRARY(taca, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor gamma, float gamma_reverse, float scale, "
      "SymInt text_begin, SymInt text_end, bool return_text_mass) -> (Tensor out, Tensor lse, "
      "Tensor text_mass)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor gamma, "
      "float gamma_reverse, float scale, SymInt text_begin, SymInt text_end) -> (Tensor dq, "
      "Tensor dk, Tensor dv)");
  m.def("has_cuda() -> bool", &taca_torch::has_cuda);
}

TORCH_LIBRARY_IMPL(taca, CPU, m) {
  m.impl("fwd", &taca_torch::fwd_cpu);
  m.impl("bwd", &taca_torch::bwd_cpu);
}

#ifdef TACA_WITH_CUDA
TORCH_LIBRARY_IMPL(taca, CUDA, m) {
  m.impl("fwd", &taca_torch::fwd_cuda);
  m.impl("bwd", &taca_torch::bwd_cuda);
}
#endif
