// bind_torch.cpp: the PyTorch binding of the taca kernels (torch.ops.taca.fwd / bwd).
//
// Modeled on pytorch/extension-cpp: the schemas live in TORCH_LIBRARY(taca), one
// TORCH_LIBRARY_IMPL per device, and an empty PyInit__C so `import taca._C` loads this
// library; taca/ops.py adds register_fake, fwd's autograd is FwdFunction (below). Tensors arrive as
// (B, N, H, D) views with any b/n/h strides (ops.py transposes "bhnd" without copying);
// outputs take the layout of the matching input (alloc_like) so the fake impls in ops.py
// reproduce their strides exactly.
//
// CPU: float32/float64 straight to taca_fwd_cpu/taca_bwd_cpu; bfloat16/float16 are upcast
// to float32 here and the results cast back. k and v may have their own token count and
// fewer heads (grouped KV); per-sample spans travel as a (B, 4) int64 tensor, masks as SDPA's
// (B, H, N_q, N_k)-broadcastable tensors (bool, or float converted to the accumulation type).
// CUDA (built with -DTACA_WITH_CUDA): float16 and bfloat16 on the current stream,
// backward with a torch-allocated workspace, deterministic unless the op's deterministic=False
// (dQ then added with unordered atomics, FlashAttention-2's way); the same features as the CPU
// (per-sample spans as a device tensor, masks, N_q != N_k, grouped KV heads), N_k >= 1.
// Build: pip install --no-build-isolation -e . (setup.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
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

// q-like tensors (out, dout): q's exact shape, dtype and device.
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

// k or v: (B, N_k, H_kv, D) with q's B and D.
void check_kv_one(const at::Tensor &t, const char *name, const at::Tensor &q) {
  TORCH_CHECK_VALUE(t.dim() == 4, "taca: ", name, " must be a 4-d (B, N_k, H_kv, D) tensor, got ",
                    t.dim(), " dimensions");
  TORCH_CHECK_VALUE(t.size(0) == q.size(0) && t.size(3) == q.size(3), "taca: ", name,
                    " has shape ", t.sizes(), " but q has shape ", q.sizes(),
                    " (batch and head dim must match)");
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "taca: ", name, " has dtype ",
                   t.scalar_type(), " but q has dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "taca: ", name, " is on ", t.device(),
                    " but q is on ", q.device());
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK_VALUE(t.stride(i) >= 0, "taca: ", name, " has a negative stride");
}

// k and v: the same shape, H % H_kv == 0 (grouped KV heads).
void check_kv(const at::Tensor &k, const at::Tensor &v, const at::Tensor &q) {
  check_kv_one(k, "k", q);
  check_kv_one(v, "v", q);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "taca: v has shape ", v.sizes(), " but k has shape ",
                    k.sizes());
  const int64_t H = q.size(2), Hkv = k.size(2);
  TORCH_CHECK_VALUE(H == 0 || (Hkv > 0 && H % Hkv == 0), "taca: q's ", H,
                    " heads must be a multiple of k's ", Hkv, " heads");
}

// The text spans; the query span -1, -1 means "the key span" (one token set).
struct Spans {
  int64_t kb, ke, qb, qe;
};

Spans check_common(const at::Tensor &q, const at::Tensor &k, const at::Tensor &gamma,
                   double gamma_reverse, double scale, int64_t text_begin, int64_t text_end,
                   int64_t q_text_begin, int64_t q_text_end,
                   const c10::optional<at::Tensor> &text_spans) {
  TORCH_CHECK_VALUE(q.dim() == 4, "taca: q must be a 4-d (B, N, H, D) tensor, got ", q.dim(),
                    " dimensions");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()),
                   "taca: q must be floating point, got ", q.scalar_type());
  const int64_t Nq = q.size(1), D = q.size(3), Nk = k.dim() == 4 ? k.size(1) : -1;
  TORCH_CHECK_VALUE(D >= 1 && D <= TACA_MAX_HEAD_DIM, "taca: head dim D=", D,
                    " must be in [1, ", TACA_MAX_HEAD_DIM, "]");
  if (q_text_begin == -1 && q_text_end == -1) {
    q_text_begin = text_begin;
    q_text_end = text_end;
  }
  if (text_spans.has_value()) {
    const at::Tensor &t = *text_spans;
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == 4,
                      "taca: text_spans must be a (", q.size(0), ", 4) tensor, got shape ",
                      t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "taca: text_spans must be int64, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == q.device(), "taca: text_spans is on ", t.device(),
                      " but q is on ", q.device());
  } else {
    TORCH_CHECK_VALUE(0 <= text_begin && text_begin <= text_end && text_end <= Nk,
                      "taca: text range [", text_begin, ", ", text_end,
                      ") must satisfy 0 <= text_begin <= text_end <= N=", Nk);
    TORCH_CHECK_VALUE(0 <= q_text_begin && q_text_begin <= q_text_end && q_text_end <= Nq,
                      "taca: query text range [", q_text_begin, ", ", q_text_end,
                      ") must satisfy 0 <= q_text_begin <= q_text_end <= N_q=", Nq,
                      " (or both -1: the key span)");
  }
  TORCH_CHECK_VALUE(std::isfinite(gamma_reverse) && gamma_reverse > 0.0,
                    "taca: gamma_reverse=", gamma_reverse, " must be finite and > 0");
  TORCH_CHECK_VALUE(std::isfinite(scale), "taca: scale=", scale, " must be finite");
  TORCH_CHECK_VALUE(gamma.dim() == 1 && gamma.size(0) == q.size(0), "taca: gamma must be a (",
                    q.size(0), ",) tensor, got shape ", gamma.sizes());
  TORCH_CHECK_TYPE(gamma.scalar_type() == acc_type(q.scalar_type()), "taca: gamma must be ",
                   acc_type(q.scalar_type()) == at::kDouble ? "float64" : "float32",
                   " (the accumulation type of ", q.scalar_type(), " inputs), got ",
                   gamma.scalar_type());
  TORCH_CHECK_VALUE(gamma.device() == q.device(), "taca: gamma is on ", gamma.device(),
                    " but q is on ", q.device());
  return Spans{text_begin, text_end, q_text_begin, q_text_end};
}

// The mask as the kernels read it: (B, H, N_q, N_k) broadcast strides over bool (1 byte) or
// accumulation-type elements; *keep holds the (converted) tensor alive.
taca_mask mask_of(const c10::optional<at::Tensor> &attn_mask, const at::Tensor &q,
                  const at::Tensor &k, at::Tensor *keep) {
  taca_mask m = {};
  m.kind = TACA_MASK_NONE;
  if (!attn_mask.has_value()) return m;
  const at::Tensor &a = *attn_mask;
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), Nk = k.size(1);
  const std::array<int64_t, 4> target = {B, H, Nq, Nk};
  TORCH_CHECK_VALUE(a.dim() <= 4, "taca: attn_mask must have at most 4 dimensions, got ", a.dim());
  for (int64_t i = 0; i < a.dim(); ++i) {
    const int64_t s = a.size(a.dim() - 1 - i), t = target[3 - i];
    TORCH_CHECK_VALUE(s == 1 || s == t, "taca: attn_mask of shape ", a.sizes(),
                      " does not broadcast to (B, H, N_q, N_k) = (", B, ", ", H, ", ", Nq, ", ",
                      Nk, ")");
  }
  TORCH_CHECK_VALUE(a.device() == q.device(), "taca: attn_mask is on ", a.device(),
                    " but q is on ", q.device());
  if (a.scalar_type() == at::kBool) {
    *keep = a.expand({B, H, Nq, Nk});
    m.kind = TACA_MASK_BOOL;
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(a.scalar_type()),
                     "taca: attn_mask must be bool or floating point, got ", a.scalar_type());
    *keep = a.to(acc_type(q.scalar_type())).expand({B, H, Nq, Nk});
    m.kind = TACA_MASK_ADD;
  }
  m.data = keep->data_ptr();
  m.b = keep->stride(0);
  m.h = keep->stride(1);
  m.q = keep->stride(2);
  m.k = keep->stride(3);
  return m;
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
                 double gamma_reverse, double scale, const Spans &sp,
                 const c10::optional<at::Tensor> &text_spans, const taca_mask &mask) {
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
  p.seqlen_k = k.size(1);
  p.heads_kv = k.size(2);
  p.text_begin = sp.kb;
  p.text_end = sp.ke;
  p.q_text_begin = sp.qb;
  p.q_text_end = sp.qe;
  p.text_spans = text_spans.has_value() ? text_spans->data_ptr<int64_t>() : nullptr;
  p.mask = mask;
  p.gamma = gamma.data_ptr();
  p.gamma_reverse = gamma_reverse;
  p.scale = scale;
  p.dtype = taca_dtype_of(q.scalar_type());
  p.num_threads = at::get_num_threads();
}

taca_fwd_params fwd_params(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                           const at::Tensor &out, const at::Tensor &lse,
                           const at::Tensor &text_mass, const at::Tensor &gamma,
                           double gamma_reverse, double scale, const Spans &sp,
                           const c10::optional<at::Tensor> &text_spans, const taca_mask &mask) {
  taca_fwd_params p = {};
  fill_shared(p, q, k, v, out, lse, gamma, gamma_reverse, scale, sp, text_spans, mask);
  p.text_mass = text_mass.numel() ? text_mass.data_ptr() : nullptr;
  return p;
}

taca_bwd_params bwd_params(const at::Tensor &dout, const at::Tensor &q, const at::Tensor &k,
                           const at::Tensor &v, const at::Tensor &out, const at::Tensor &lse,
                           const at::Tensor &dq, const at::Tensor &dk, const at::Tensor &dv,
                           const at::Tensor &gamma, double gamma_reverse, double scale,
                           const Spans &sp, const c10::optional<at::Tensor> &text_spans,
                           const taca_mask &mask, bool deterministic) {
  taca_bwd_params p = {};
  fill_shared(p, q, k, v, out, lse, gamma, gamma_reverse, scale, sp, text_spans, mask);
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dout_stride = strides_of(dout);
  p.dq_stride = strides_of(dq);
  p.dk_stride = strides_of(dk);
  p.dv_stride = strides_of(dv);
  p.deterministic = deterministic ? 1 : 0;
  return p;
}

// ---- CPU ----

// Host gamma values are checked here, inside the op, so the check also runs under
// torch.compile (the CUDA path cannot read them without a sync).
at::Tensor host_gamma(const at::Tensor &gamma) {
  at::Tensor g = gamma.contiguous();
  for (int64_t i = 0; i < g.numel(); ++i) {
    const double x = g.scalar_type() == at::kDouble ? g.data_ptr<double>()[i]
                                                    : static_cast<double>(g.data_ptr<float>()[i]);
    TORCH_CHECK_VALUE(std::isfinite(x) && x > 0.0, "taca: gamma[", i, "]=", x,
                      " must be finite and > 0");
  }
  return g;
}

// Host per-sample spans, checked here for the same reason; contiguous for the kernel.
c10::optional<at::Tensor> host_spans(const c10::optional<at::Tensor> &spans, int64_t Nq,
                                     int64_t Nk) {
  if (!spans.has_value()) return spans;
  at::Tensor t = spans->contiguous();
  const int64_t *s = t.data_ptr<int64_t>();
  for (int64_t b = 0; b < t.size(0); ++b) {
    const int64_t *r = s + 4 * b;
    TORCH_CHECK_VALUE(0 <= r[0] && r[0] <= r[1] && r[1] <= Nk, "taca: text_spans[", b,
                      "] key span [", r[0], ", ", r[1], ") must lie in [0, N_k=", Nk, "]");
    TORCH_CHECK_VALUE(0 <= r[2] && r[2] <= r[3] && r[3] <= Nq, "taca: text_spans[", b,
                      "] query span [", r[2], ", ", r[3], ") must lie in [0, N_q=", Nq, "]");
  }
  return t;
}

bool cpu_native(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

Tensor3 fwd_cpu(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                const at::Tensor &gamma, double gamma_reverse, double scale, int64_t text_begin,
                int64_t text_end, bool return_text_mass, int64_t q_text_begin,
                int64_t q_text_end, const c10::optional<at::Tensor> &text_spans,
                const c10::optional<at::Tensor> &attn_mask, bool /*deterministic: backward only*/) {
  check_bnhd(q_in, "q", q_in);
  const Spans sp = check_common(q_in, k_in, gamma, gamma_reverse, scale, text_begin, text_end,
                                q_text_begin, q_text_end, text_spans);
  check_kv(k_in, v_in, q_in);
  TORCH_CHECK_VALUE(q_in.device().is_cpu(), "taca: fwd CPU impl got q on ", q_in.device());
  const int64_t B = q_in.size(0), N = q_in.size(1), H = q_in.size(2);
  const at::ScalarType dt = q_in.scalar_type(), acc = acc_type(dt);
  at::Tensor out = alloc_like(q_in, dt);
  at::Tensor lse = at::empty({B, H, N}, q_in.options().dtype(acc));
  at::Tensor tm = return_text_mass ? at::empty({B, H, N}, q_in.options().dtype(acc))
                                   : at::empty({0}, q_in.options().dtype(acc));
  at::Tensor mask_keep;
  const taca_mask mask = mask_of(attn_mask, q_in, k_in, &mask_keep);
  if (B * N * H == 0) return {out, lse, tm};
  const at::Tensor g = host_gamma(gamma);
  const c10::optional<at::Tensor> spans = host_spans(text_spans, N, k_in.size(1));

  const bool native = cpu_native(dt);
  at::Tensor q = unit_last_stride(native ? q_in : q_in.to(at::kFloat));
  at::Tensor k = unit_last_stride(native ? k_in : k_in.to(at::kFloat));
  at::Tensor v = unit_last_stride(native ? v_in : v_in.to(at::kFloat));
  at::Tensor o = native ? out : alloc_like(q_in, at::kFloat);
  taca_fwd_params p = fwd_params(q, k, v, o, lse, tm, g, gamma_reverse, scale, sp, spans, mask);
  check_status(taca_fwd_cpu(&p), "forward (CPU)");
  if (!native) out.copy_(o);
  return {out, lse, tm};
}

Tensor3 bwd_cpu(const at::Tensor &dout_in, const at::Tensor &q_in, const at::Tensor &k_in,
                const at::Tensor &v_in, const at::Tensor &out_in, const at::Tensor &lse_in,
                const at::Tensor &gamma, double gamma_reverse, double scale, int64_t text_begin,
                int64_t text_end, int64_t q_text_begin, int64_t q_text_end,
                const c10::optional<at::Tensor> &text_spans,
                const c10::optional<at::Tensor> &attn_mask, bool deterministic) {
  check_bnhd(q_in, "q", q_in);
  const Spans sp = check_common(q_in, k_in, gamma, gamma_reverse, scale, text_begin, text_end,
                                q_text_begin, q_text_end, text_spans);
  check_kv(k_in, v_in, q_in);
  check_bnhd(out_in, "out", q_in);
  check_bnhd(dout_in, "dout", q_in);
  check_lse(lse_in, q_in);
  TORCH_CHECK_VALUE(q_in.device().is_cpu(), "taca: bwd CPU impl got q on ", q_in.device());
  const at::ScalarType dt = q_in.scalar_type();
  at::Tensor dq = alloc_like(q_in, dt), dk = alloc_like(k_in, dt), dv = alloc_like(v_in, dt);
  at::Tensor mask_keep;
  const taca_mask mask = mask_of(attn_mask, q_in, k_in, &mask_keep);
  if (q_in.size(0) * q_in.size(1) * q_in.size(2) == 0) {  // no query: nothing reads k, v
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor g = host_gamma(gamma);
  const c10::optional<at::Tensor> spans = host_spans(text_spans, q_in.size(1), k_in.size(1));

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
                                 scale, sp, spans, mask, deterministic);
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

// Per-sample spans for the CUDA kernels: contiguous int64 on q's device. Their values select
// which logits get gamma and never address memory, so they are not read back here (no host
// sync); taca.joint_attention checks them.
c10::optional<at::Tensor> device_spans(const c10::optional<at::Tensor> &spans) {
  if (!spans.has_value()) return spans;
  return spans->contiguous();
}

void check_cuda_keys(const at::Tensor &k) {
  TORCH_CHECK_VALUE(k.size(1) > 0, "taca: the CUDA kernel needs at least one key token, got N_k=0");
}

// The CUDA forwards' outputs: out like q, lse (B, H, N_q) float32, text_mass the same or empty.
Tensor3 cuda_fwd_outputs(const at::Tensor &q, bool return_text_mass) {
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2);
  const auto f32 = q.options().dtype(at::kFloat);
  return {alloc_like(q, q.scalar_type()), at::empty({B, H, N}, f32),
          return_text_mass ? at::empty({B, H, N}, f32) : at::empty({0}, f32)};
}

Tensor3 fwd_cuda(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                 const at::Tensor &gamma_in, double gamma_reverse, double scale,
                 int64_t text_begin, int64_t text_end, bool return_text_mass, int64_t q_text_begin,
                 int64_t q_text_end, const c10::optional<at::Tensor> &text_spans,
                 const c10::optional<at::Tensor> &attn_mask, bool /*deterministic: backward only*/) {
  check_bnhd(q_in, "q", q_in);
  const Spans sp = check_common(q_in, k_in, gamma_in, gamma_reverse, scale, text_begin, text_end,
                                q_text_begin, q_text_end, text_spans);
  check_kv(k_in, v_in, q_in);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "taca: fwd CUDA impl got q on ", q_in.device());
  check_cuda_dtype(q_in);
  check_cuda_keys(k_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out, lse, tm;
  std::tie(out, lse, tm) = cuda_fwd_outputs(q_in, return_text_mass);
  if (q_in.size(0) * q_in.size(1) * q_in.size(2) == 0) return {out, lse, tm};
  at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor gamma = gamma_in.contiguous();
  at::Tensor mask_keep;
  const taca_mask mask = mask_of(attn_mask, q_in, k_in, &mask_keep);
  const c10::optional<at::Tensor> spans = device_spans(text_spans);
  taca_fwd_params p = fwd_params(q, k, v, out, lse, tm, gamma, gamma_reverse, scale, sp, spans, mask);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // scratch for the D = 128 forward's tail split (where it runs; 0 bytes otherwise: no allocation)
  const size_t ws_bytes = taca_fwd_cuda_workspace_size(&p);
  at::Tensor workspace;
  if (ws_bytes) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q_in.options().dtype(at::kByte));
  check_status(taca_fwd_cuda_ws(&p, ws_bytes ? workspace.data_ptr() : nullptr, ws_bytes, static_cast<void *>(stream)),
               "forward (CUDA)");
  return {out, lse, tm};
}

Tensor3 bwd_cuda(const at::Tensor &dout_in, const at::Tensor &q_in, const at::Tensor &k_in,
                 const at::Tensor &v_in, const at::Tensor &out_in, const at::Tensor &lse_in,
                 const at::Tensor &gamma_in, double gamma_reverse, double scale,
                 int64_t text_begin, int64_t text_end, int64_t q_text_begin, int64_t q_text_end,
                 const c10::optional<at::Tensor> &text_spans,
                 const c10::optional<at::Tensor> &attn_mask, bool deterministic) {
  check_bnhd(q_in, "q", q_in);
  const Spans sp = check_common(q_in, k_in, gamma_in, gamma_reverse, scale, text_begin, text_end,
                                q_text_begin, q_text_end, text_spans);
  check_kv(k_in, v_in, q_in);
  check_bnhd(out_in, "out", q_in);
  check_bnhd(dout_in, "dout", q_in);
  check_lse(lse_in, q_in);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "taca: bwd CUDA impl got q on ", q_in.device());
  check_cuda_dtype(q_in);
  check_cuda_keys(k_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::ScalarType dt = q_in.scalar_type();
  at::Tensor dq = alloc_like(q_in, dt), dk = alloc_like(k_in, dt), dv = alloc_like(v_in, dt);
  if (q_in.size(0) * q_in.size(1) * q_in.size(2) == 0) return {dq, dk, dv};
  at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in),
             out = unit_last_stride(out_in), dout = unit_last_stride(dout_in);
  at::Tensor lse = lse_in.contiguous(), gamma = gamma_in.contiguous();
  at::Tensor mask_keep;
  const taca_mask mask = mask_of(attn_mask, q_in, k_in, &mask_keep);
  const c10::optional<at::Tensor> spans = device_spans(text_spans);
  taca_bwd_params p = bwd_params(dout, q, k, v, out, lse, dq, dk, dv, gamma, gamma_reverse,
                                 scale, sp, spans, mask, deterministic);
  const size_t ws_bytes = taca_bwd_workspace_size(&p);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, q_in.options().dtype(at::kByte));
  p.workspace = ws_bytes ? workspace.data_ptr() : nullptr;
  p.workspace_bytes = ws_bytes;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_status(taca_bwd_cuda(&p, static_cast<void *>(stream)), "backward (CUDA)");
  return {dq, dk, dv};
}

// The opt-in FP8 (e4m3) forward for inference: q, k, v quantized into a workspace by the kernel's own
// passes (taca.h, taca_fwd_fp8_cuda). No mask, no per-sample spans, head dim 128 (taca.joint_attention
// checks these before it gets here, with messages naming the argument).
Tensor3 fwd_fp8_cuda(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                     const at::Tensor &gamma_in, double gamma_reverse, double scale, int64_t text_begin,
                     int64_t text_end, bool return_text_mass, int64_t q_text_begin, int64_t q_text_end) {
  check_bnhd(q_in, "q", q_in);
  const Spans sp = check_common(q_in, k_in, gamma_in, gamma_reverse, scale, text_begin, text_end,
                                q_text_begin, q_text_end, c10::nullopt);
  check_kv(k_in, v_in, q_in);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "taca: fwd_fp8 got q on ", q_in.device(), ", needs a CUDA device");
  check_cuda_dtype(q_in);
  check_cuda_keys(k_in);
  TORCH_CHECK_VALUE(q_in.size(3) == 128, "taca: fp8=True takes head dim 128, got ", q_in.size(3));
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out, lse, tm;
  std::tie(out, lse, tm) = cuda_fwd_outputs(q_in, return_text_mass);
  if (q_in.size(0) * q_in.size(1) * q_in.size(2) == 0) return {out, lse, tm};
  // 16-byte rows for the quantization passes' loads: copy what is not so aligned
  auto rows16 = [](const at::Tensor &t) {
    at::Tensor u = unit_last_stride(t);
    const bool ok = reinterpret_cast<uintptr_t>(u.data_ptr()) % 16 == 0 && u.stride(0) % 8 == 0 &&
                    u.stride(1) % 8 == 0 && u.stride(2) % 8 == 0;
    return ok ? u : u.contiguous();
  };
  at::Tensor q = rows16(q_in), k = rows16(k_in), v = rows16(v_in);
  at::Tensor gamma = gamma_in.contiguous();
  const taca_mask no_mask = {nullptr, TACA_MASK_NONE, 0, 0, 0, 0};
  taca_fwd_params p = fwd_params(q, k, v, out, lse, tm, gamma, gamma_reverse, scale, sp, c10::nullopt, no_mask);
  const size_t ws_bytes = taca_fwd_fp8_workspace_size(&p);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q_in.options().dtype(at::kByte));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int st = taca_fwd_fp8_cuda(&p, workspace.data_ptr(), ws_bytes, static_cast<void *>(stream));
  TORCH_CHECK(st != TACA_ERR_UNSUPPORTED,
              "taca: fp8=True needs an sm_90 (Hopper) GPU and a taca build for sm_90a "
              "(TORCH_CUDA_ARCH_LIST containing 9.0a); this device or build cannot run it");
  check_status(st, "forward fp8 (CUDA)");
  return {out, lse, tm};
}

#endif  // TACA_WITH_CUDA

// fwd's autograd in C++ (as torchvision's ops: a torch::autograd::Function at the Autograd key, the fake
// impls in Python): the forward redispatches below autograd, the backward node calls taca::bwd. It replaced
// torch.library.register_autograd's Python Function, whose glue (apply, setup_context, the backward's
// Python) cost ~270 us per forward + backward on a CPU where the op itself took ~50 us: per call host time
// that a small-batch training step, bound by its host, pays in full (KERNEL_LOG, forty-fourth session).
// gamma, the spans and the mask get no gradient (the Python version's None); lse and text_mass none either.
using FwdSig = Tensor3(const at::Tensor &, const at::Tensor &, const at::Tensor &, const at::Tensor &, double,
                       double, c10::SymInt, c10::SymInt, bool, c10::SymInt, c10::SymInt,
                       const c10::optional<at::Tensor> &, const c10::optional<at::Tensor> &, bool);
using BwdSig = Tensor3(const at::Tensor &, const at::Tensor &, const at::Tensor &, const at::Tensor &,
                       const at::Tensor &, const at::Tensor &, const at::Tensor &, double, double, c10::SymInt,
                       c10::SymInt, c10::SymInt, c10::SymInt, const c10::optional<at::Tensor> &,
                       const c10::optional<at::Tensor> &, bool);

class FwdFunction : public torch::autograd::Function<FwdFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext *ctx, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
      const at::Tensor &gamma, double gamma_reverse, double scale, c10::SymInt text_begin, c10::SymInt text_end,
      bool return_text_mass, c10::SymInt q_text_begin, c10::SymInt q_text_end,
      const c10::optional<at::Tensor> &text_spans, const c10::optional<at::Tensor> &attn_mask, bool deterministic) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("taca::fwd", "").typed<FwdSig>();
    Tensor3 res;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      res = op.call(q, k, v, gamma, gamma_reverse, scale, text_begin, text_end, return_text_mass, q_text_begin,
                    q_text_end, text_spans, attn_mask, deterministic);
    }
    auto &[out, lse, tm] = res;
    ctx->save_for_backward({q, k, v, out, lse, gamma, text_spans.value_or(at::Tensor()),
                            attn_mask.value_or(at::Tensor())});
    ctx->saved_data["gamma_reverse"] = gamma_reverse;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["text_begin"] = text_begin;
    ctx->saved_data["text_end"] = text_end;
    ctx->saved_data["q_text_begin"] = q_text_begin;
    ctx->saved_data["q_text_end"] = q_text_end;
    ctx->saved_data["deterministic"] = deterministic;
    ctx->mark_non_differentiable({lse, tm});
    return {out, lse, tm};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("taca::bwd", "").typed<BwdSig>();
    const auto s = ctx->get_saved_variables();
    const auto opt = [](const at::Tensor &t) {
      return t.defined() ? c10::optional<at::Tensor>(t) : c10::optional<at::Tensor>();
    };
    auto &d = ctx->saved_data;
    auto [dq, dk, dv] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], d["gamma_reverse"].toDouble(),
                                d["scale"].toDouble(), d["text_begin"].toSymInt(), d["text_end"].toSymInt(),
                                d["q_text_begin"].toSymInt(), d["q_text_end"].toSymInt(), opt(s[6]), opt(s[7]),
                                d["deterministic"].toBool());
    torch::autograd::variable_list g(14);  // one per forward argument; undefined: no gradient
    g[0] = dq;
    g[1] = dk;
    g[2] = dv;
    return g;
  }
};

Tensor3 fwd_autograd(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &gamma,
                     double gamma_reverse, double scale, c10::SymInt text_begin, c10::SymInt text_end,
                     bool return_text_mass, c10::SymInt q_text_begin, c10::SymInt q_text_end,
                     const c10::optional<at::Tensor> &text_spans, const c10::optional<at::Tensor> &attn_mask,
                     bool deterministic) {
  auto r = FwdFunction::apply(q, k, v, gamma, gamma_reverse, scale, std::move(text_begin), std::move(text_end),
                              return_text_mass, std::move(q_text_begin), std::move(q_text_end), text_spans,
                              attn_mask, deterministic);
  return {r[0], r[1], r[2]};
}

}  // namespace taca_torch

TORCH_LIBRARY(taca, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor gamma, float gamma_reverse, float scale, "
      "SymInt text_begin, SymInt text_end, bool return_text_mass, SymInt q_text_begin=-1, "
      "SymInt q_text_end=-1, Tensor? text_spans=None, Tensor? attn_mask=None, "
      "bool deterministic=True) -> (Tensor out, Tensor lse, Tensor text_mass)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor gamma, "
      "float gamma_reverse, float scale, SymInt text_begin, SymInt text_end, "
      "SymInt q_text_begin=-1, SymInt q_text_end=-1, Tensor? text_spans=None, "
      "Tensor? attn_mask=None, bool deterministic=True) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "fwd_fp8(Tensor q, Tensor k, Tensor v, Tensor gamma, float gamma_reverse, float scale, "
      "SymInt text_begin, SymInt text_end, bool return_text_mass, SymInt q_text_begin=-1, "
      "SymInt q_text_end=-1) -> (Tensor out, Tensor lse, Tensor text_mass)");
  m.def("has_cuda() -> bool", &taca_torch::has_cuda);
}

TORCH_LIBRARY_IMPL(taca, Autograd, m) { m.impl("fwd", &taca_torch::fwd_autograd); }

TORCH_LIBRARY_IMPL(taca, CPU, m) {
  m.impl("fwd", &taca_torch::fwd_cpu);
  m.impl("bwd", &taca_torch::bwd_cpu);
}

#ifdef TACA_WITH_CUDA
TORCH_LIBRARY_IMPL(taca, CUDA, m) {
  m.impl("fwd", &taca_torch::fwd_cuda);
  m.impl("bwd", &taca_torch::bwd_cuda);
  m.impl("fwd_fp8", &taca_torch::fwd_fp8_cuda);
}
#endif
