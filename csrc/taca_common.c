/*
 * taca_common.c: status strings and the parameter validation shared by every
 * kernel entry point (CPU and CUDA) and by the bindings.
 * Build: part of every taca extension; plain C99, no dependencies.
 */
#include "taca.h"

#include <math.h>

const char *taca_status_string(int status) {
    switch (status) {
    case TACA_OK: return "ok";
    case TACA_ERR_NULL_POINTER: return "a required pointer is NULL";
    case TACA_ERR_SHAPE:
        return "sizes must be non-negative, their products must fit in int64, and heads must be "
               "a multiple of heads_kv";
    case TACA_ERR_HEAD_DIM: return "head_dim must be in [1, 256]";
    case TACA_ERR_TEXT_RANGE:
        return "text spans must satisfy 0 <= begin <= end <= N (seqlen_k for keys, seqlen for "
               "queries)";
    case TACA_ERR_GAMMA: return "gamma and gamma_reverse must be finite and > 0";
    case TACA_ERR_SCALE: return "scale must be finite";
    case TACA_ERR_DTYPE: return "dtype is not supported by this kernel";
    case TACA_ERR_STRIDE: return "strides must be non-negative";
    case TACA_ERR_UNSUPPORTED: return "this build or device cannot run these parameters";
    case TACA_ERR_ALLOC: return "host memory allocation failed";
    case TACA_ERR_CUDA: return "CUDA runtime error";
    case TACA_ERR_WORKSPACE: return "workspace is too small";
    case TACA_ERR_MASK: return "mask kind must be none, bool or additive, with strides >= 0";
    default: return "unknown taca status";
    }
}

static int mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a != 0 && b > INT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

/* Shapes and the shared text spans of the fields both params structs have. */
#define TACA_CHECK_PROBLEM(p)                                                                  \
    check_problem((p)->batch, (p)->seqlen, (p)->heads, (p)->head_dim, (p)->seqlen_k,           \
                  (p)->heads_kv, (p)->text_begin, (p)->text_end, (p)->q_text_begin,            \
                  (p)->q_text_end, (p)->text_spans != NULL, &(p)->mask)

static int check_problem(int64_t B, int64_t Nq, int64_t H, int64_t D, int64_t Nk, int64_t Hkv,
                         int64_t tb, int64_t te, int64_t qtb, int64_t qte, int per_sample,
                         const taca_mask *mask) {
    int64_t t;
    if (B < 0 || Nq < 0 || H < 0 || D < 0 || Nk < 0 || Hkv < 0) return TACA_ERR_SHAPE;
    if (!mul_ok(B, Nq, &t) || !mul_ok(t, H, &t) || !mul_ok(t, D, &t)) return TACA_ERR_SHAPE;
    if (!mul_ok(B, Nk, &t) || !mul_ok(t, Hkv, &t) || !mul_ok(t, D, &t)) return TACA_ERR_SHAPE;
    if (H > 0 && (Hkv < 1 || H % Hkv != 0)) return TACA_ERR_SHAPE;
    if (D < 1 || D > TACA_MAX_HEAD_DIM) return TACA_ERR_HEAD_DIM;
    if (!per_sample && (tb < 0 || tb > te || te > Nk || qtb < 0 || qtb > qte || qte > Nq))
        return TACA_ERR_TEXT_RANGE;
    if (mask->kind != TACA_MASK_NONE && mask->kind != TACA_MASK_BOOL && mask->kind != TACA_MASK_ADD)
        return TACA_ERR_MASK;
    if (mask->kind != TACA_MASK_NONE && (mask->b < 0 || mask->h < 0 || mask->q < 0 || mask->k < 0))
        return TACA_ERR_MASK;
    return TACA_OK;
}

static int check_strides(const taca_strides *s) {
    return (s->b < 0 || s->n < 0 || s->h < 0) ? TACA_ERR_STRIDE : TACA_OK;
}

static int check_scalars(double gamma_reverse, double scale) {
    if (!isfinite(gamma_reverse) || !(gamma_reverse > 0.0)) return TACA_ERR_GAMMA;
    if (!isfinite(scale)) return TACA_ERR_SCALE;
    return TACA_OK;
}

static int check_dtype(taca_dtype d) {
    return (d == TACA_F32 || d == TACA_F64 || d == TACA_F16 || d == TACA_BF16) ? TACA_OK
                                                                               : TACA_ERR_DTYPE;
}

int taca_check_fwd(const taca_fwd_params *p) {
    int st;
    if (!p) return TACA_ERR_NULL_POINTER;
    if ((st = TACA_CHECK_PROBLEM(p)) != TACA_OK) return st;
    if ((st = check_dtype(p->dtype)) != TACA_OK) return st;
    if ((st = check_scalars(p->gamma_reverse, p->scale)) != TACA_OK) return st;
    if ((st = check_strides(&p->q_stride)) || (st = check_strides(&p->k_stride)) ||
        (st = check_strides(&p->v_stride)) || (st = check_strides(&p->out_stride)))
        return st;
    if (p->batch * p->seqlen * p->heads == 0) return TACA_OK; /* nothing to read or write */
    if (!p->q || !p->out || !p->gamma) return TACA_ERR_NULL_POINTER;
    if (p->seqlen_k > 0 && (!p->k || !p->v)) return TACA_ERR_NULL_POINTER;
    if (p->mask.kind != TACA_MASK_NONE && p->seqlen_k > 0 && !p->mask.data)
        return TACA_ERR_NULL_POINTER;
    return TACA_OK;
}

int taca_check_bwd(const taca_bwd_params *p) {
    int st;
    if (!p) return TACA_ERR_NULL_POINTER;
    if ((st = TACA_CHECK_PROBLEM(p)) != TACA_OK) return st;
    if ((st = check_dtype(p->dtype)) != TACA_OK) return st;
    if ((st = check_scalars(p->gamma_reverse, p->scale)) != TACA_OK) return st;
    if ((st = check_strides(&p->q_stride)) || (st = check_strides(&p->k_stride)) ||
        (st = check_strides(&p->v_stride)) || (st = check_strides(&p->out_stride)) ||
        (st = check_strides(&p->dout_stride)) || (st = check_strides(&p->dq_stride)) ||
        (st = check_strides(&p->dk_stride)) || (st = check_strides(&p->dv_stride)))
        return st;
    if (p->batch * p->seqlen * p->heads == 0) return TACA_OK;
    if (!p->q || !p->out || !p->dout || !p->lse || !p->dq || !p->gamma)
        return TACA_ERR_NULL_POINTER;
    if (p->seqlen_k > 0 && (!p->k || !p->v || !p->dk || !p->dv)) return TACA_ERR_NULL_POINTER;
    if (p->mask.kind != TACA_MASK_NONE && p->seqlen_k > 0 && !p->mask.data)
        return TACA_ERR_NULL_POINTER;
    return TACA_OK;
}
