/*
 * taca.h: the C ABI of the gamma-scaled joint attention kernels.
 *
 * Per sample b: N_q query tokens and N_k key/value tokens (one token set when N_q == N_k and
 * the spans agree). Text keys are the contiguous range [k_begin, k_end) and text queries
 * [q_begin, q_end) (FLUX: [0, L) both, SD3: [N-L, N) both; image-only queries: an empty query
 * span); every other token is "visual". The spans are shared by the batch (text_begin,
 * text_end, q_text_begin, q_text_end) or per sample (text_spans).
 *
 *   s_ij = scale * (q_i . k_j) * m_ij + mask_ij
 *   m_ij = gamma[b]       if i visual and j text
 *          gamma_reverse  if i text   and j visual
 *          1              otherwise
 *   out_i = sum_j softmax_j(s_ij) v_j,   lse_i = log sum_j exp(s_ij),
 *   text_mass_i = sum_{j text} softmax_j(s_ij)
 * mask_ij is 0 without a mask, -inf where a bool mask is 0, the value of an additive mask. A
 * row whose every s_ij is -inf (fully masked) gets out_i = 0, lse_i = -inf, text_mass_i = 0
 * and zero gradients. Query head h reads key/value head h / (heads / heads_kv) (grouped KV
 * heads; heads % heads_kv == 0).
 *
 * Tensors are addressed as (B, N, H, D) with element strides for b, n, h and a
 * contiguous last dimension (stride 1), so (B, N, H, D) and (B, H, N, D) views of
 * any storage are both accepted without copies. lse and text_mass are contiguous
 * (B, H, N_q) arrays of the accumulation type: double for TACA_F64 inputs, float for
 * every other dtype.
 *
 * Scalars: scale and gamma_reverse are double; the per-sample gamma array and an additive mask
 * are of the accumulation type. So float64 inputs are computed with float64 scalars end to end,
 * and kernels of float accumulation round them to float once.
 *
 * No Python, no torch, no CUDA runtime types here: a CUDA stream travels as void*.
 * Every entry point validates its params and returns a taca_status; it never aborts.
 */
#ifndef TACA_H_
#define TACA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TACA_MAX_HEAD_DIM 256

typedef enum {
    TACA_OK = 0,
    TACA_ERR_NULL_POINTER = 1,  /* a required pointer is NULL */
    TACA_ERR_SHAPE = 2,         /* a size is negative, sizes overflow, or heads % heads_kv != 0 */
    TACA_ERR_HEAD_DIM = 3,      /* head_dim < 1 or > TACA_MAX_HEAD_DIM */
    TACA_ERR_TEXT_RANGE = 4,    /* a text span is not 0 <= begin <= end <= N_k (keys) / N_q */
    TACA_ERR_GAMMA = 5,         /* gamma <= 0 or not finite, gamma_reverse likewise */
    TACA_ERR_SCALE = 6,         /* scale not finite */
    TACA_ERR_DTYPE = 7,         /* dtype unknown or not supported by this device */
    TACA_ERR_STRIDE = 8,        /* a stride is negative */
    TACA_ERR_UNSUPPORTED = 9,   /* valid input this build or device cannot run */
    TACA_ERR_ALLOC = 10,        /* host allocation failed */
    TACA_ERR_CUDA = 11,         /* a CUDA runtime error; see taca_last_cuda_error() */
    TACA_ERR_WORKSPACE = 12,    /* workspace too small */
    TACA_ERR_MASK = 13          /* mask kind unknown, or a mask stride negative */
} taca_status;

typedef enum {
    TACA_F32 = 0,
    TACA_F64 = 1,   /* CPU only */
    TACA_F16 = 2,   /* CUDA only */
    TACA_BF16 = 3   /* CUDA only */
} taca_dtype;

/* Element strides of one (B, N, H, D) tensor: batch, token, head. D stride is 1. */
typedef struct {
    int64_t b, n, h;
} taca_strides;

typedef enum {
    TACA_MASK_NONE = 0,
    TACA_MASK_BOOL = 1,  /* uint8 elements: nonzero = attend, 0 = s_ij is -inf */
    TACA_MASK_ADD = 2    /* elements of the accumulation type, added to s_ij */
} taca_mask_kind;

/*
 * An optional mask, broadcast to (B, H, N_q, N_k) by its element strides (0 repeats a
 * dimension, as a broadcast torch view does). Memory on the kernel's device.
 */
typedef struct {
    const void *data;          /* may be NULL when kind == TACA_MASK_NONE */
    int kind;                  /* taca_mask_kind */
    int64_t b, h, q, k;        /* element strides */
} taca_mask;

/*
 * The shape and text layout fields taca_fwd_params and taca_bwd_params share.
 * q/out: (B, seqlen, heads, D); k/v: (B, seqlen_k, heads_kv, D).
 */
#define TACA_PROBLEM_FIELDS                                                                  \
    int64_t batch, seqlen, heads, head_dim; /* seqlen: N_q tokens, heads: query heads */      \
    int64_t seqlen_k, heads_kv;             /* N_k key/value tokens, key/value heads */       \
    int64_t text_begin, text_end;           /* text keys [begin, end), shared by the batch */ \
    int64_t q_text_begin, q_text_end;       /* text queries [begin, end), shared */           \
    /* NULL, or (B, 4) int64 per sample {k_begin, k_end, q_begin, q_end}, overriding the four \
     * fields above; host memory for the CPU kernels, device memory for the CUDA kernels. */ \
    const int64_t *text_spans;                                                               \
    taca_mask mask;                                                                          \
    /* (B,) per-sample gamma of the accumulation type (double for TACA_F64, else float):     \
     * host memory for the CPU kernels, device memory for the CUDA kernels (no host sync). */ \
    const void *gamma;                                                                       \
    double gamma_reverse;                                                                    \
    double scale;              /* usually 1/sqrt(head_dim) */                                 \
    taca_dtype dtype;                                                                        \
    int num_threads            /* CPU: OpenMP threads, <= 0 means the runtime default */

typedef struct {
    const void *q, *k, *v;     /* q: (B, N_q, H, D); k, v: (B, N_k, H_kv, D) */
    void *out;                 /* (B, N_q, H, D), written */
    void *lse;                 /* (B, H, N_q) contiguous, accumulation type; may be NULL */
    void *text_mass;           /* (B, H, N_q) contiguous, accumulation type; may be NULL */
    taca_strides q_stride, k_stride, v_stride, out_stride;
    TACA_PROBLEM_FIELDS;
} taca_fwd_params;

typedef struct {
    const void *q, *k, *v, *out, *dout;  /* as in forward; out and dout (B, N_q, H, D) */
    const void *lse;           /* (B, H, N_q) contiguous, accumulation type, from forward */
    void *dq, *dk, *dv;        /* like q, k, v; written */
    taca_strides q_stride, k_stride, v_stride, out_stride, dout_stride;
    taca_strides dq_stride, dk_stride, dv_stride;
    TACA_PROBLEM_FIELDS;
    /* Scratch memory of at least taca_bwd_workspace_size() bytes on the kernel's
     * device (may be NULL when that size is 0). */
    void *workspace;
    size_t workspace_bytes;
    int deterministic;         /* nonzero: no floating-point atomics */
} taca_bwd_params;

/* Human-readable text for a status code (static storage, never NULL). */
const char *taca_status_string(int status);

/* Shared validation, called by every entry point; also callable by bindings. */
int taca_check_fwd(const taca_fwd_params *p);
int taca_check_bwd(const taca_bwd_params *p);

/* CPU kernels (taca_fwd_cpu.c, taca_bwd_cpu.c): TACA_F32 and TACA_F64, every feature above. */
int taca_fwd_cpu(const taca_fwd_params *p);
int taca_bwd_cpu(const taca_bwd_params *p);

/* CUDA kernels (cuda/taca_fwd.cu, cuda/taca_bwd.cu): TACA_F16 and TACA_BF16, every
 * pointer on the current device; stream is a cudaStream_t (NULL: default stream).
 * Asynchronous: they return after the launch. Every feature above (per-sample spans, separate
 * query and key token sets, grouped KV heads, masks: additive masks as float32). The forward
 * returns TACA_ERR_UNSUPPORTED for seqlen_k == 0 (every row fully masked; the CPU kernels take
 * it), the backward for seqlen == 0 with keys (dk, dv would need zeroing). */
int taca_fwd_cuda(const taca_fwd_params *p, void *stream);
/* taca_fwd_cuda with scratch memory (taca_fwd_cuda_workspace_size bytes, on the device; 0 bytes: none needed, and
 * taca_fwd_cuda_ws is taca_fwd_cuda). The one user so far is the tail split of the D = 128 Hopper forward (FLUX's
 * head dim; environment TACA_FWD_SPLIT=0 turns it off): the partial last wave's query tiles run as key ranges spread
 * over every SM and merged by the last range (the same outputs up to the merge's rounding, deterministic).
 * taca_fwd_cuda, without a workspace, runs those tiles whole. */
size_t taca_fwd_cuda_workspace_size(const taca_fwd_params *p);
int taca_fwd_cuda_ws(const taca_fwd_params *p, void *workspace, size_t workspace_bytes, void *stream);
int taca_bwd_cuda(const taca_bwd_params *p, void *stream);
size_t taca_bwd_workspace_size(const taca_bwd_params *p);  /* CUDA backward scratch */
/* Opt-in FP8 (e4m3) forward for inference (cuda/taca_fwd_sm90_fp8.cuh): q, k, v (TACA_F16 / TACA_BF16) quantized
 * into the workspace (Q and K one scale per 128-token tile, V one per channel), the products in e4m3 with fp32
 * accumulation, out / lse / text_mass as taca_fwd_cuda writes them. head_dim 128, 16-byte aligned inputs, no
 * text_spans or mask, an sm_90 device and an sm_90a build: TACA_ERR_UNSUPPORTED otherwise. The workspace
 * (taca_fwd_fp8_workspace_size bytes, on the device) holds the quantized inputs. */
size_t taca_fwd_fp8_workspace_size(const taca_fwd_params *p);
int taca_fwd_fp8_cuda(const taca_fwd_params *p, void *workspace, size_t workspace_bytes, void *stream);
const char *taca_last_cuda_error(void);  /* text of the last TACA_ERR_CUDA, or "" */

#ifdef __cplusplus
}
#endif

#endif /* TACA_H_ */
