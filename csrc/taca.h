/*
 * taca.h: the C ABI of the gamma-scaled joint attention kernels.
 *
 * One sequence of N tokens per sample; text tokens are the contiguous range
 * [text_begin, text_end) (FLUX: [0, L), SD3: [N-L, N)); every other token is "visual".
 *
 *   s_ij = scale * (q_i . k_j) * m_ij
 *   m_ij = gamma[b]       if i visual and j text
 *          gamma_reverse  if i text   and j visual
 *          1              otherwise
 *   out_i = sum_j softmax_j(s_ij) v_j,   lse_i = log sum_j exp(s_ij),
 *   text_mass_i = sum_{j text} softmax_j(s_ij)
 *
 * Tensors are addressed as (B, N, H, D) with element strides for b, n, h and a
 * contiguous last dimension (stride 1), so (B, N, H, D) and (B, H, N, D) views of
 * any storage are both accepted without copies. lse and text_mass are contiguous
 * (B, H, N) arrays of the accumulation type: double for TACA_F64 inputs, float for
 * every other dtype.
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
    TACA_ERR_SHAPE = 2,         /* a size is negative, or sizes overflow */
    TACA_ERR_HEAD_DIM = 3,      /* head_dim < 1 or > TACA_MAX_HEAD_DIM */
    TACA_ERR_TEXT_RANGE = 4,    /* not 0 <= text_begin <= text_end <= seqlen */
    TACA_ERR_GAMMA = 5,         /* gamma <= 0 or not finite, gamma_reverse likewise */
    TACA_ERR_SCALE = 6,         /* scale not finite */
    TACA_ERR_DTYPE = 7,         /* dtype unknown or not supported by this device */
    TACA_ERR_STRIDE = 8,        /* a stride is negative */
    TACA_ERR_UNSUPPORTED = 9,   /* valid input this build or device cannot run */
    TACA_ERR_ALLOC = 10,        /* host allocation failed */
    TACA_ERR_CUDA = 11,         /* a CUDA runtime error; see taca_last_cuda_error() */
    TACA_ERR_WORKSPACE = 12     /* workspace too small */
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

typedef struct {
    const void *q, *k, *v;     /* (B, N, H, D) */
    void *out;                 /* (B, N, H, D), written */
    void *lse;                 /* (B, H, N) contiguous, accumulation type; may be NULL */
    void *text_mass;           /* (B, H, N) contiguous, accumulation type; may be NULL */
    taca_strides q_stride, k_stride, v_stride, out_stride;
    int64_t batch, seqlen, heads, head_dim;
    int64_t text_begin, text_end;
    /* (B,) float32 per-sample gamma: host memory for the CPU kernels, device memory
     * for the CUDA kernels (read on the device: no host sync). */
    const float *gamma;
    float gamma_reverse;
    float scale;               /* usually 1/sqrt(head_dim) */
    taca_dtype dtype;
    int num_threads;           /* CPU: OpenMP threads, <= 0 means the runtime default */
} taca_fwd_params;

typedef struct {
    const void *q, *k, *v, *out, *dout;  /* (B, N, H, D) */
    const void *lse;           /* (B, H, N) contiguous, accumulation type, from forward */
    void *dq, *dk, *dv;        /* (B, N, H, D), written */
    taca_strides q_stride, k_stride, v_stride, out_stride, dout_stride;
    taca_strides dq_stride, dk_stride, dv_stride;
    int64_t batch, seqlen, heads, head_dim;
    int64_t text_begin, text_end;
    const float *gamma;        /* (B,) float32, as in forward */
    float gamma_reverse;
    float scale;
    taca_dtype dtype;
    int num_threads;
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

/* CPU kernels (taca_fwd_cpu.c, taca_bwd_cpu.c): TACA_F32 and TACA_F64. */
int taca_fwd_cpu(const taca_fwd_params *p);
int taca_bwd_cpu(const taca_bwd_params *p);

/* CUDA kernels (cuda/taca_fwd.cu, cuda/taca_bwd.cu): TACA_F16 and TACA_BF16, every
 * pointer on the current device; stream is a cudaStream_t (NULL: default stream).
 * Asynchronous: they return after the launch. */
int taca_fwd_cuda(const taca_fwd_params *p, void *stream);
int taca_bwd_cuda(const taca_bwd_params *p, void *stream);
size_t taca_bwd_workspace_size(const taca_bwd_params *p);  /* CUDA backward scratch */
const char *taca_last_cuda_error(void);  /* text of the last TACA_ERR_CUDA, or "" */

#ifdef __cplusplus
}
#endif

#endif /* TACA_H_ */
