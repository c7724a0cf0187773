/*
 * taca_fwd.cu: fused CUDA forward of gamma-scaled joint attention (TACA), FlashAttention-2 style.
 *
 * Math (DESIGN.md section 1): s_ij = scale * (q_i . k_j) * m_ij with m_ij = gamma[b] for
 * (visual query, text key), gamma_reverse for (text query, visual key), 1 otherwise;
 * out_i = softmax_j(s_ij) v_j, lse_i = log sum_j exp(s_ij), text_mass_i = sum_{j text} P_ij.
 *
 * Shapes: q, k, v, out (B, N, H, D) with element strides per b, n, h and D contiguous;
 * lse, text_mass (B, H, N) float32 contiguous; gamma (B,) float32 in device memory.
 *
 * Algorithm: one CTA of 4 warps per (query tile of BR rows, head, sample). Q is staged once in
 * shared memory; K and V tiles of BC keys stream through shared memory with cp.async, V_j's load
 * overlapping S = Q K_j^T and K_{j+1}'s load overlapping O += P V_j. Each warp owns 16*MT query
 * rows, keeps O (fp32) and the running max / row sum / text-column sum in registers, and feeds
 * the tensor cores (mma.sync m16n8k16, fragments via ldmatrix) from shared memory. The TACA
 * multiplier is applied per element as one select + one multiply folded with scale*log2(e), so
 * the softmax runs in base 2 (ex2.approx). text_mass is a second running sum over text columns,
 * rescaled with the same alpha as the row sum. Nothing N x N ever exists.
 *
 * Head dims are padded up to DP in {32, 64, 96, 128, 160, 192, 256} with zero-filled loads.
 * Fast path (ALIGNED): D % 8 == 0, every base pointer 16-byte aligned and every stride a
 * multiple of 8 elements -> 16-byte cp.async loads and stores. Otherwise element-wise loads and
 * stores (correct for any D, pointer and stride; slower).
 *
 * Files: taca_fwd_kernel.cuh (kernel template, configs), taca_fwd_bf16.cu / taca_fwd_f16.cu
 * (instances), this file (entry point, error text).
 * Build: part of taca._C (setup.py); standalone check:
 *   nvcc -std=c++17 -O3 -Icsrc -Icsrc/cuda -gencode=arch=compute_90a,code=sm_90a -c \
 *        csrc/cuda/taca_fwd.cu -o /tmp/x.o -Xptxas -v
 * Kernel versions and measured speeds: benchmarks/results/KERNEL_LOG.md.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "taca.h"
#include "taca_cuda_common.cuh"
#include "taca_fwd_kernel.cuh"

using taca_fwd::FwdArgs;

/* taca_fwd_sm90.cu: the wgmma forward; TACA_ERR_UNSUPPORTED where it does not apply. ws: the tail split's
 * workspace or NULL (taca_fwd_sm90_split_bytes: its size, 0 where no split runs). */
int taca_fwd_sm90(const taca_fwd::FwdArgs &a, int dtype, int variant, int batch, int heads,
                  cudaStream_t stream, void *ws, size_t ws_bytes);
size_t taca_fwd_sm90_split_bytes(const taca_fwd::FwdArgs &a, int variant, int batch, int heads);
int taca_fwd_fp8_sm90(const taca_fwd::FwdArgs &a, int dtype, int variant, int batch, int heads, void *workspace,
                      cudaStream_t stream);

static thread_local char g_last_cuda_error[512] = "";

int taca_cuda_record_error(cudaError_t err, const char *where) {
    snprintf(g_last_cuda_error, sizeof(g_last_cuda_error), "%s: %s (%s)", where ? where : "taca",
             cudaGetErrorString(err), cudaGetErrorName(err));
    return TACA_ERR_CUDA;
}

extern "C" const char *taca_last_cuda_error(void) { return g_last_cuda_error; }

namespace {

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
bool mult8(const taca_strides &s) { return s.b % 8 == 0 && s.n % 8 == 0 && s.h % 8 == 0; }

}  // namespace

/* The kernels' argument block of a checked taca_fwd_params. */
static FwdArgs fwd_args(const taca_fwd_params *p) {
    FwdArgs a;
    a.q = p->q;
    a.k = p->k;
    a.v = p->v;
    a.out = p->out;
    a.lse = static_cast<float *>(p->lse);
    a.text_mass = static_cast<float *>(p->text_mass);
    a.qb = p->q_stride.b; a.qn = p->q_stride.n; a.qh = p->q_stride.h;
    a.kb = p->k_stride.b; a.kn = p->k_stride.n; a.kh = p->k_stride.h;
    a.vb = p->v_stride.b; a.vn = p->v_stride.n; a.vh = p->v_stride.h;
    a.ob = p->out_stride.b; a.on = p->out_stride.n; a.oh = p->out_stride.h;
    a.n = (int)p->seqlen;
    a.nk = (int)p->seqlen_k;
    a.d = (int)p->head_dim;
    a.tb = (int)p->text_begin;
    a.te = (int)p->text_end;
    a.qtb = (int)p->q_text_begin;
    a.qte = (int)p->q_text_end;
    a.group = (int)(p->heads / p->heads_kv);
    a.spans = p->text_spans;
    a.mask = taca_cuda::mask_args(p->mask);
    a.gamma = static_cast<const float *>(p->gamma);  /* float: the accumulation type */
    a.gamma_reverse = static_cast<float>(p->gamma_reverse);
    a.scale_log2 = static_cast<float>(p->scale * 1.4426950408889634);
    return a;
}

/* The sizes every CUDA forward refuses (int indices inside the kernels, grid limits). */
static bool fwd_too_large(const taca_fwd_params *p) {
    return p->seqlen > INT32_MAX - 256 || p->seqlen_k > INT32_MAX - 256 || p->heads > 65535 || p->batch > 65535;
}

static bool fwd_aligned(const taca_fwd_params *p) {
    return p->head_dim % 8 == 0 && aligned16(p->q) && aligned16(p->k) && aligned16(p->v) && aligned16(p->out) &&
           mult8(p->q_stride) && mult8(p->k_stride) && mult8(p->v_stride) && mult8(p->out_stride);
}

/* Internal tuning entry (not in taca.h): taca_fwd_cuda_ws with a chosen tiling variant. */
extern "C" int taca_fwd_cuda_variant_ws(const taca_fwd_params *p, void *workspace, size_t workspace_bytes, void *stream,
                                        int variant) {
    int st = taca_check_fwd(p);
    if (st != TACA_OK) return st;
    if (p->dtype != TACA_F16 && p->dtype != TACA_BF16) return TACA_ERR_DTYPE;
    if (p->batch * p->seqlen * p->heads == 0) return TACA_OK;
    if (fwd_too_large(p)) return TACA_ERR_UNSUPPORTED;
    if (p->seqlen_k == 0) return TACA_ERR_UNSUPPORTED;  /* no keys: every row fully masked */

    const FwdArgs a = fwd_args(p);
    const bool aligned = fwd_aligned(p);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int B = (int)p->batch, H = (int)p->heads;
    // Hopper path (taca_fwd_sm90.cu) for aligned D = 64 / 128 on sm_90 when built for sm_90a;
    // variants 1..6 force the mma.sync kernel (6 = its default tiling).
    if (aligned && (variant == 0 || variant >= 7)) {
        const int st90 = taca_fwd_sm90(a, p->dtype, variant, B, H, s, workspace, workspace_bytes);
        if (st90 != TACA_ERR_UNSUPPORTED) return st90;
    }
    if (variant == 6) variant = 0;
    if (p->dtype == TACA_BF16) return taca_fwd::dispatch_bf16(a, variant, aligned, B, H, s);
    return taca_fwd::dispatch_f16(a, variant, aligned, B, H, s);
}

/* Internal tuning entry (not in taca.h): taca_fwd_cuda with a chosen tiling variant. */
extern "C" int taca_fwd_cuda_variant(const taca_fwd_params *p, void *stream, int variant) {
    return taca_fwd_cuda_variant_ws(p, nullptr, 0, stream, variant);
}

extern "C" int taca_fwd_cuda(const taca_fwd_params *p, void *stream) {
    return taca_fwd_cuda_variant_ws(p, nullptr, 0, stream, 0);
}

extern "C" size_t taca_fwd_cuda_workspace_size(const taca_fwd_params *p) {
    // the one case that takes a workspace: the tail split (its plan, fwd_split_plan, reads TACA_FWD_SPLIT)
    if (taca_check_fwd(p) != TACA_OK || (p->dtype != TACA_F16 && p->dtype != TACA_BF16)) return 0;
    if (p->batch * p->seqlen * p->heads == 0 || fwd_too_large(p) || p->seqlen_k == 0 || !fwd_aligned(p)) return 0;
    return taca_fwd_sm90_split_bytes(fwd_args(p), 0, (int)p->batch, (int)p->heads);
}

extern "C" int taca_fwd_cuda_ws(const taca_fwd_params *p, void *workspace, size_t workspace_bytes, void *stream) {
    return taca_fwd_cuda_variant_ws(p, workspace, workspace_bytes, stream, 0);
}

extern "C" size_t taca_fwd_fp8_workspace_size(const taca_fwd_params *p) {
    if (taca_check_fwd(p) != TACA_OK) return 0;
    return (size_t)taca_fwd::fp8_layout(p->batch, p->heads, p->heads_kv, p->seqlen, p->seqlen_k).total;
}

/* Internal tuning entry (not in taca.h): taca_fwd_fp8_cuda with a chosen variant (0, 2, 4, 10, 12, 14: see below). */
extern "C" int taca_fwd_fp8_cuda_variant(const taca_fwd_params *p, void *workspace, size_t workspace_bytes, void *stream,
                                         int variant) {
    int st = taca_check_fwd(p);
    if (st != TACA_OK) return st;
    if (p->dtype != TACA_F16 && p->dtype != TACA_BF16) return TACA_ERR_DTYPE;
    if (p->head_dim != 128 || p->text_spans || p->mask.kind != TACA_MASK_NONE) return TACA_ERR_UNSUPPORTED;
    if (p->batch * p->seqlen * p->heads == 0) return TACA_OK;
    if (fwd_too_large(p) || p->seqlen_k == 0 || !fwd_aligned(p)) return TACA_ERR_UNSUPPORTED;
    if (!workspace || workspace_bytes < taca_fwd_fp8_workspace_size(p)) return TACA_ERR_WORKSPACE;
    return taca_fwd_fp8_sm90(fwd_args(p), p->dtype, variant, (int)p->batch, (int)p->heads, workspace,
                             static_cast<cudaStream_t>(stream));
}

/* TACA_FP8_VARIANT=n: the FP8 kernel's variant n (a timing switch, the same outputs up to the order of P V's
 * rounding: 2 / 4 stages of the K / V ring instead of 3, + 10 the intra-warpgroup overlap). */
extern "C" int taca_fwd_fp8_cuda(const taca_fwd_params *p, void *workspace, size_t workspace_bytes, void *stream) {
    const char *env = getenv("TACA_FP8_VARIANT");
    const int variant = env ? atoi(env) : 0;
    return taca_fwd_fp8_cuda_variant(p, workspace, workspace_bytes, stream, variant);
}
