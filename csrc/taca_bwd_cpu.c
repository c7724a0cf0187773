/*
 * taca_bwd_cpu.c: CPU backward of gamma-scaled joint attention (TACA), float32 and float64.
 *
 * Differentiates the forward (taca_fwd_cpu.c) "s_ij = (q_i . k_j) c_ij, P = softmax_j(s),
 * out_i = sum_j P_ij v_j" with c_ij = scale * m_ij:
 *   P_ij  = exp(s_ij - lse_i)                       (recomputed from the saved lse)
 *   dP_ij = dO_i . v_j,   delta_i = dO_i . O_i,   dS_ij = P_ij (dP_ij - delta_i)
 *   dV_j  = sum_i P_ij dO_i
 *   dK_j  = sum_i dS_ij c_ij q_i
 *   dQ_i  = sum_j dS_ij c_ij k_j
 * No atomics, no N x N storage, deterministic: every output element is summed by one task in
 * a fixed order, so runs repeat bit for bit (for a given thread count: the float32 schedule
 * below depends on it, and the two schedules round differently). Pass 0 computes delta
 * (B, H, N, double) into malloc'd scratch. Then either
 *   fused:  one task per (b, h) head: per key tile dK, dV; dQ of the whole head accumulates in
 *           a per-thread (N, Dp) buffer (5 GEMM-like products per tile pair), or
 *   split:  pass 1 over (b, h, key tile) owns dK, dV of its keys; pass 2 over (b, h, query
 *           tile) owns dQ of its queries (S and dP recomputed: 7 products, but more tasks).
 * float32/AVX2 takes "fused" when the heads split evenly over the threads (B*H % threads == 0)
 * or there are many (B*H >= 4 threads), "split" otherwise; the portable path is always split,
 * one row per task.
 *
 * Two implementations, as in the forward: float32 with AVX2+FMA (tiles of TACA_T = 96,
 * transposed tiles packed once per task, the other operands read in place, float
 * accumulation) and a portable one (float64 always, float32 without AVX2; double accumulation).
 * Measured (one Zen 3 core, float32, B=1, H=8, N=1152, 128 text tokens): forward + backward
 * 0.78x the time of torch 2.13's CPU SDPA forward + backward (no gamma) at D=64, 1.03x at D=128.
 *
 * Shapes: q, out, dout, dq: (B, N_q, H, D); k, v, dk, dv: (B, N_k, H_kv, D); element strides
 *         (b, n, h), D contiguous. lse: (B, H, N_q) contiguous, float (F32) or double (F64).
 * Grouped KV heads: a key tile task owns dK, dV of its kv head and sums over the H / H_kv query
 * heads reading it (no atomics); the fused schedule needs H_kv == H. Masks: the forward's term is
 * added to each recomputed logit; a row with lse = -inf (fully masked) has P = dS = 0.
 * Scratch: B*H*N doubles for delta plus per-thread tiles (and the fused dQ buffer), malloc;
 *          TACA_ERR_ALLOC if that fails. The workspace fields of the params are not used.
 * Build: part of libtaca_core (setup.py): cc -O3 -std=c99 -fopenmp -march=native.
 */
#include "taca_cpu_common.h"

static void delta_portable(const taca_bwd_params *p, double *delta, int nt) {
    const int f64 = p->dtype == TACA_F64;
    const int64_t H = p->heads, N = p->seqlen, D = p->head_dim;
    const int64_t ntask = p->batch * H * N;
    int64_t t;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (t = 0; t < ntask; ++t) {
        int64_t i = t % N, bh = t / N, b = bh / H, h = bh % H;
        double o[TACA_MAX_HEAD_DIM];
        taca_row_load(p->out, taca_off(&p->out_stride, b, i, h), D, f64, o);
        delta[t] = taca_row_dot(o, p->dout, taca_off(&p->dout_stride, b, i, h), D, f64);
    }
}

/* dK_j, dV_j for key j of kv head hk of sample b: summed over the query heads reading it. */
static void bwd_key_portable(const taca_bwd_params *p, const double *delta, int64_t b, int64_t hk,
                             int64_t j, double *kj, double *vj, double *dk, double *dv) {
    const int f64 = p->dtype == TACA_F64;
    const int64_t N = p->seqlen, D = p->head_dim, group = p->heads / p->heads_kv;
    const taca_span sp = TACA_SPAN_OF(p, b);
    const int key_text = taca_is_text(j, sp.kb, sp.ke);
    const double g = taca_gamma_at(p->gamma, f64, b);
    double ct, cv;
    int64_t i, d, h;

    taca_row_load(p->k, taca_off(&p->k_stride, b, j, hk), D, f64, kj);
    taca_row_load(p->v, taca_off(&p->v_stride, b, j, hk), D, f64, vj);
    for (d = 0; d < D; ++d) dk[d] = dv[d] = 0.0;
    for (h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t row0 = (b * p->heads + h) * N;
        for (i = 0; i < N; ++i) {
            const int64_t qo = taca_off(&p->q_stride, b, i, h);
            const int64_t go = taca_off(&p->dout_stride, b, i, h);
            const double lse = taca_vec_load(p->lse, row0 + i, f64);
            double c, s, pr, dp, ds;
            if (lse == -INFINITY) continue; /* fully masked row: P = 0 */
            taca_row_mults(taca_is_text(i, sp.qb, sp.qe), p->scale, g, p->gamma_reverse, &ct, &cv);
            c = key_text ? ct : cv;
            s = taca_row_dot(kj, p->q, qo, D, f64) * c;
            if (p->mask.kind != TACA_MASK_NONE) s += taca_mask_at(&p->mask, f64, b, h, i, j);
            pr = exp(s - lse);
            dp = taca_row_dot(vj, p->dout, go, D, f64);
            ds = pr * (dp - delta[row0 + i]);
            taca_row_axpy(pr, p->dout, go, D, f64, dv);
            taca_row_axpy(ds * c, p->q, qo, D, f64, dk);
        }
    }
    taca_row_store(p->dk, taca_off(&p->dk_stride, b, j, hk), D, f64, dk, 1.0);
    taca_row_store(p->dv, taca_off(&p->dv_stride, b, j, hk), D, f64, dv, 1.0);
}

/* dQ_i for query i of (b, h). */
static void bwd_query_portable(const taca_bwd_params *p, const double *delta, int64_t b,
                               int64_t h, int64_t i, double *qi, double *gi, double *dq) {
    const int f64 = p->dtype == TACA_F64;
    const int64_t N = p->seqlen_k, D = p->head_dim;
    const int64_t hk = taca_kv_head(h, p->heads, p->heads_kv);
    const int64_t row = (b * p->heads + h) * p->seqlen + i;
    const taca_span sp = TACA_SPAN_OF(p, b);
    const double lse = taca_vec_load(p->lse, row, f64), dl = delta[row];
    double ct, cv;
    int64_t j, d;

    for (d = 0; d < D; ++d) dq[d] = 0.0;
    if (lse != -INFINITY) { /* a fully masked row has dQ = 0 */
        taca_row_mults(taca_is_text(i, sp.qb, sp.qe), p->scale, taca_gamma_at(p->gamma, f64, b),
                       p->gamma_reverse, &ct, &cv);
        taca_row_load(p->q, taca_off(&p->q_stride, b, i, h), D, f64, qi);
        taca_row_load(p->dout, taca_off(&p->dout_stride, b, i, h), D, f64, gi);
        for (j = 0; j < N; ++j) {
            const int64_t ko = taca_off(&p->k_stride, b, j, hk);
            const double c = taca_is_text(j, sp.kb, sp.ke) ? ct : cv;
            double s = taca_row_dot(qi, p->k, ko, D, f64) * c, pr, dp;
            if (p->mask.kind != TACA_MASK_NONE) s += taca_mask_at(&p->mask, f64, b, h, i, j);
            pr = exp(s - lse);
            dp = taca_row_dot(gi, p->v, taca_off(&p->v_stride, b, j, hk), D, f64);
            taca_row_axpy(pr * (dp - dl) * c, p->k, ko, D, f64, dq);
        }
    }
    taca_row_store(p->dq, taca_off(&p->dq_stride, b, i, h), D, f64, dq, 1.0);
}

#if TACA_CPU_AVX2
TACA_AVX2_BEGIN
/*
 * Tiled float32 backward. Two schedules, both without atomics and deterministic:
 *   fused (when the (b, h) heads split evenly over the threads, or there are many): one task
 *     per head; per key tile, per query tile: S = Q K^T, dP = dO V^T, P, G = dS * c, then
 *     dV += P^T dO, dK += G^T Q and dQ += G K into a per-thread (N, Dp) accumulator (5 GEMMs).
 *   split: pass 1 over (b, h, key tile) does the same without dQ; pass 2 over (b, h, query
 *     tile) recomputes S^T = K Q^T and dP^T = V dO^T and accumulates dQ (7 GEMMs, more tasks).
 */
typedef struct {
    float *kt, *vt;             /* (D, T) key / value tile transposed (pass 1) */
    float *qt, *qv, *dot;       /* (D, T) scaled query tiles / dO tile transposed (pass 2) */
    float *s, *dp;              /* (T, T) logits -> P, dP -> G */
    float *dk, *dv, *dq;        /* (T, Dp) accumulators */
    float *qbuf, *dobuf, *kbuf; /* (T, Dp) padded row operands when D % 8 != 0 */
    float *multt, *multv;       /* (T,) per key: multiplier for a text / visual query */
    float *ct, *cv, *lse, *dl;  /* (T,) per query */
    float *live;                /* (T,) per query: 0 for a fully masked row (lse -inf), else 1 */
    float *mrow;                /* (T,) per key: the mask terms of one query row */
    float *dqacc;               /* (N_q, Dp) fused schedule only */
} bwd_scratch;

static float *bwd_scratch_init(bwd_scratch *w, int64_t D, int64_t N, int fused, void **raw) {
    const int64_t T = TACA_T, Dp = taca_pad8(D);
    const int64_t n = 5 * D * T + 2 * T * T + 6 * T * Dp + 8 * T + (fused ? N * Dp : 0);
    float *x = (float *)taca_aligned_malloc((size_t)n * sizeof(float), raw);
    if (!x) return NULL;
    w->kt = x; x += D * T;
    w->vt = x; x += D * T;
    w->qt = x; x += D * T;
    w->qv = x; x += D * T;
    w->dot = x; x += D * T;
    w->s = x; x += T * T;
    w->dp = x; x += T * T;
    w->dk = x; x += T * Dp;
    w->dv = x; x += T * Dp;
    w->dq = x; x += T * Dp;
    w->qbuf = x; x += T * Dp;
    w->dobuf = x; x += T * Dp;
    w->kbuf = x; x += T * Dp;
    w->multt = x; x += T;
    w->multv = x; x += T;
    w->ct = x; x += T;
    w->cv = x; x += T;
    w->lse = x; x += T;
    w->dl = x; x += T;
    w->live = x; x += T;
    w->mrow = x; x += T;
    w->dqacc = fused ? x : NULL;
    return w->kt;
}

static void store_rows(float *dst, const taca_strides *s, int64_t b, int64_t h, int64_t n0, int nr,
                       const float *src, int64_t D, int64_t Dp) {
    int r;
    for (r = 0; r < nr; ++r)
        memcpy(dst + taca_off(s, b, n0 + r, h), src + r * Dp, (size_t)D * sizeof(float));
}

/* Mask terms of query row i of (b, h) against keys k0 .. k0+nk (0 past nk). */
static void mask_row(const taca_bwd_params *p, float *mrow, int64_t b, int64_t h, int64_t i,
                     int64_t k0, int nk) {
    int j;
    for (j = 0; j < TACA_T; ++j)
        mrow[j] = j < nk ? (float)taca_mask_at(&p->mask, 0, b, h, i, k0 + j) : 0.0f;
}

/*
 * dK, dV of keys k0 .. k0+nk of kv head hk of sample b, summed over the query heads that read
 * it; with dqacc (fused schedule, one query head per kv head), also adds this tile's dQ part.
 */
static void bwd_ktile_f32(const taca_bwd_params *p, bwd_scratch *w, const double *delta, int64_t b,
                          int64_t hk, int64_t k0, int nk, float *dqacc) {
    const int64_t N = p->seqlen, D = p->head_dim, Dp = taca_pad8(D), T = TACA_T;
    const int64_t group = p->heads / p->heads_kv;
    const taca_span sp = TACA_SPAN_OF(p, b);
    const float sc = (float)p->scale, g = (float)taca_gamma_at(p->gamma, 0, b);
    const float gr = (float)p->gamma_reverse;
    const int masked = p->mask.kind != TACA_MASK_NONE;
    const float *kop = NULL;
    int64_t q0, ldk = 0, ldq, ldo, h;
    int i, j;

    taca_pack_cols(w->kt, (const float *)p->k, &p->k_stride, b, hk, k0, nk, D);
    taca_pack_cols(w->vt, (const float *)p->v, &p->v_stride, b, hk, k0, nk, D);
    for (j = 0; j < T; ++j) {
        const int key_text = j < nk && taca_is_text(k0 + j, sp.kb, sp.ke);
        w->multt[j] = key_text ? sc : sc * gr;
        w->multv[j] = key_text ? sc * g : sc;
    }
    memset(w->dk, 0, (size_t)(T * Dp) * sizeof(float));
    memset(w->dv, 0, (size_t)(T * Dp) * sizeof(float));
    if (dqacc)
        kop = taca_rows_operand((const float *)p->k, &p->k_stride, b, hk, k0, nk, D, w->kbuf, &ldk);
    for (h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t row0 = (b * p->heads + h) * N;
        for (q0 = 0; q0 < N; q0 += T) {
            const int nq = (int)(N - q0 < T ? N - q0 : T);
            const float *qop = taca_rows_operand((const float *)p->q, &p->q_stride, b, h, q0, nq,
                                                 D, w->qbuf, &ldq);
            const float *dop = taca_rows_operand((const float *)p->dout, &p->dout_stride, b, h, q0,
                                                 nq, D, w->dobuf, &ldo);
            taca_gemm_f32(nq, (int)T, (int)D, qop, ldq, 1, w->kt, T, w->s, T, 0);
            taca_gemm_f32(nq, (int)T, (int)D, dop, ldo, 1, w->vt, T, w->dp, T, 0);
            for (i = 0; i < nq; ++i) {
                const float *mult = taca_is_text(q0 + i, sp.qb, sp.qe) ? w->multt : w->multv;
                const float lse_i = ((const float *)p->lse)[row0 + q0 + i];
                const __m256 lse = _mm256_set1_ps(lse_i);
                const __m256 dl = _mm256_set1_ps((float)delta[row0 + q0 + i]);
                float *srow = w->s + i * T, *grow = w->dp + i * T;
                if (lse_i == -INFINITY) { /* fully masked row: P = 0, dS = 0 */
                    memset(srow, 0, (size_t)T * sizeof(float));
                    memset(grow, 0, (size_t)T * sizeof(float));
                    continue;
                }
                if (masked) mask_row(p, w->mrow, b, h, q0 + i, k0, nk);
                for (j = 0; j < T; j += 8) {
                    const __m256 m = _mm256_load_ps(mult + j);
                    __m256 x = _mm256_mul_ps(_mm256_load_ps(srow + j), m), pr, ds;
                    if (masked) x = _mm256_add_ps(x, _mm256_load_ps(w->mrow + j));
                    pr = taca_exp256(_mm256_sub_ps(x, lse));
                    ds = _mm256_mul_ps(pr, _mm256_sub_ps(_mm256_load_ps(grow + j), dl));
                    _mm256_store_ps(srow + j, pr);
                    _mm256_store_ps(grow + j, _mm256_mul_ps(ds, m));
                }
            }
            /* dV_j += sum_i P_ij dO_i;  dK_j += sum_i G_ij q_i;  dQ_i += sum_j G_ij k_j */
            taca_gemm_f32(nk, (int)Dp, nq, w->s, 1, T, dop, ldo, w->dv, Dp, 1);
            taca_gemm_f32(nk, (int)Dp, nq, w->dp, 1, T, qop, ldq, w->dk, Dp, 1);
            if (dqacc)
                taca_gemm_f32(nq, (int)Dp, nk, w->dp, T, 1, kop, ldk, dqacc + q0 * Dp, Dp, 1);
        }
    }
    store_rows((float *)p->dk, &p->dk_stride, b, hk, k0, nk, w->dk, D, Dp);
    store_rows((float *)p->dv, &p->dv_stride, b, hk, k0, nk, w->dv, D, Dp);
}

/* dQ of queries q0 .. q0+nq of (b, h) (split schedule, pass 2). */
static void bwd_qtile_f32(const taca_bwd_params *p, bwd_scratch *w, const double *delta, int64_t b,
                          int64_t h, int64_t q0, int nq) {
    const int64_t N = p->seqlen_k, D = p->head_dim, Dp = taca_pad8(D), T = TACA_T;
    const int64_t hk = taca_kv_head(h, p->heads, p->heads_kv);
    const int64_t row0 = (b * p->heads + h) * p->seqlen;
    const taca_span sp = TACA_SPAN_OF(p, b);
    const int masked = p->mask.kind != TACA_MASK_NONE;
    int64_t k0, ldk;
    int i, j, iv;

    taca_pack_q_scaled((const float *)p->q, &p->q_stride, b, h, q0, nq, D, sp.qb, sp.qe, p->scale,
                       taca_gamma_at(p->gamma, 0, b), p->gamma_reverse, w->qt, w->qv, w->ct,
                       w->cv);
    taca_pack_cols(w->dot, (const float *)p->dout, &p->dout_stride, b, h, q0, nq, D);
    for (i = 0; i < T; ++i) {
        const float lse = i < nq ? ((const float *)p->lse)[row0 + q0 + i] : 0.0f;
        w->live[i] = lse == -INFINITY ? 0.0f : 1.0f; /* fully masked rows get dQ = 0 */
        w->lse[i] = lse == -INFINITY ? 0.0f : lse;
        w->dl[i] = i < nq ? (float)delta[row0 + q0 + i] : 0.0f;
    }
    memset(w->dq, 0, (size_t)(T * Dp) * sizeof(float));
    for (k0 = 0; k0 < N; k0 += T) {
        const int nk = (int)(N - k0 < T ? N - k0 : T);
        const float *kop;
        taca_logits_t((const float *)p->k, &p->k_stride, b, hk, k0, nk, D, sp.kb, sp.ke, w->qt,
                      w->qv, w->s);
        if (masked) {
            for (j = 0; j < nk; ++j)
                for (i = 0; i < nq; ++i)
                    w->s[j * T + i] += (float)taca_mask_at(&p->mask, 0, b, h, q0 + i, k0 + j);
        }
        taca_gemm_f32(nk, (int)T, (int)D, (const float *)p->v + taca_off(&p->v_stride, b, k0, hk),
                      p->v_stride.n, 1, w->dot, T, w->dp, T, 0);
        for (j = 0; j < nk; ++j) {
            const float *c = taca_is_text(k0 + j, sp.kb, sp.ke) ? w->ct : w->cv;
            float *srow = w->s + j * T, *grow = w->dp + j * T;
            for (iv = 0; iv < T; iv += 8) {
                const __m256 pr = taca_exp256(
                    _mm256_sub_ps(_mm256_load_ps(srow + iv), _mm256_load_ps(w->lse + iv)));
                const __m256 ds = _mm256_mul_ps(
                    _mm256_mul_ps(pr, _mm256_load_ps(w->live + iv)),
                    _mm256_sub_ps(_mm256_load_ps(grow + iv), _mm256_load_ps(w->dl + iv)));
                _mm256_store_ps(grow + iv, _mm256_mul_ps(ds, _mm256_load_ps(c + iv)));
            }
        }
        kop = taca_rows_operand((const float *)p->k, &p->k_stride, b, hk, k0, nk, D, w->kbuf, &ldk);
        taca_gemm_f32((int)T, (int)Dp, nk, w->dp, 1, T, kop, ldk, w->dq, Dp, 1);
    }
    store_rows((float *)p->dq, &p->dq_stride, b, h, q0, nq, w->dq, D, Dp);
}

static int bwd_f32(const taca_bwd_params *p, const double *delta, int nt) {
    const int64_t H = p->heads, N = p->seqlen, D = p->head_dim, Dp = taca_pad8(D), T = TACA_T;
    const int64_t Hkv = p->heads_kv, Nk = p->seqlen_k;
    const int64_t BH = p->batch * H, ntile = (N + T - 1) / T, ntile_k = (Nk + T - 1) / T;
    /* fused needs one query head per kv head (its dQ buffer is one head's) */
    const int fused = Hkv == H && (nt == 1 || BH % nt == 0 || BH >= 4 * (int64_t)nt);
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        bwd_scratch w;
        void *raw = NULL;
        int64_t t;
        memset(&w, 0, sizeof(w));
        if (!bwd_scratch_init(&w, D, N, fused, &raw)) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed && fused) {
#pragma omp for schedule(dynamic, 1)
            for (t = 0; t < BH; ++t) {
                const int64_t b = t / H, h = t % H;
                int64_t k0;
                memset(w.dqacc, 0, (size_t)(N * Dp) * sizeof(float));
                for (k0 = 0; k0 < Nk; k0 += T)
                    bwd_ktile_f32(p, &w, delta, b, h, k0, (int)(Nk - k0 < T ? Nk - k0 : T),
                                  w.dqacc);
                store_rows((float *)p->dq, &p->dq_stride, b, h, 0, (int)N, w.dqacc, D, Dp);
            }
        } else if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (t = 0; t < p->batch * Hkv * ntile_k; ++t) {
                const int64_t bh = t / ntile_k, k0 = (t % ntile_k) * T;
                bwd_ktile_f32(p, &w, delta, bh / Hkv, bh % Hkv, k0,
                              (int)(Nk - k0 < T ? Nk - k0 : T), NULL);
            }
#pragma omp for schedule(dynamic, 1)
            for (t = 0; t < BH * ntile; ++t) {
                const int64_t bh = t / ntile, q0 = (t % ntile) * T;
                bwd_qtile_f32(p, &w, delta, bh / H, bh % H, q0, (int)(N - q0 < T ? N - q0 : T));
            }
        }
        free(raw);
    }
    return failed ? TACA_ERR_ALLOC : TACA_OK;
}
TACA_AVX2_END
#endif

static void bwd_portable(const taca_bwd_params *p, const double *delta, int nt) {
    const int64_t H = p->heads, N = p->seqlen, Hkv = p->heads_kv, Nk = p->seqlen_k;
    const int64_t nq_task = p->batch * H * N, nk_task = p->batch * Hkv * Nk;
    int64_t t;
    (void)nt;
#pragma omp parallel num_threads(nt)
    {
        double a[TACA_MAX_HEAD_DIM], c[TACA_MAX_HEAD_DIM], e[TACA_MAX_HEAD_DIM],
            f[TACA_MAX_HEAD_DIM];
#pragma omp for schedule(static)
        for (t = 0; t < nk_task; ++t) {
            int64_t bh = t / Nk;
            bwd_key_portable(p, delta, bh / Hkv, bh % Hkv, t % Nk, a, c, e, f);
        }
#pragma omp for schedule(static)
        for (t = 0; t < nq_task; ++t) {
            int64_t bh = t / N;
            bwd_query_portable(p, delta, bh / H, bh % H, t % N, a, c, e);
        }
    }
}

/* dK = dV = 0 when no query reads the keys (N_q == 0 with N_k > 0). */
static void zero_kv_grads(const taca_bwd_params *p) {
    const int64_t D = p->head_dim;
    const size_t es = p->dtype == TACA_F64 ? sizeof(double) : sizeof(float);
    int64_t b, n, h;
    for (b = 0; b < p->batch; ++b)
        for (n = 0; n < p->seqlen_k; ++n)
            for (h = 0; h < p->heads_kv; ++h) {
                memset((char *)p->dk + (size_t)taca_off(&p->dk_stride, b, n, h) * es, 0,
                       (size_t)D * es);
                memset((char *)p->dv + (size_t)taca_off(&p->dv_stride, b, n, h) * es, 0,
                       (size_t)D * es);
            }
}

int taca_bwd_cpu(const taca_bwd_params *p) {
    int64_t nrows;
    double work;
    double *delta;
    int st = taca_check_bwd(p);
    if (st != TACA_OK) return st;
    if (p->dtype != TACA_F32 && p->dtype != TACA_F64) return TACA_ERR_DTYPE;
    if (p->batch * p->seqlen * p->heads == 0) {
        if (p->batch * p->seqlen_k * p->heads_kv > 0) zero_kv_grads(p);
        return TACA_OK;
    }
    if ((st = taca_check_gamma_host(p->gamma, p->dtype == TACA_F64, p->batch)) != TACA_OK)
        return st;
    if ((st = taca_check_spans_host(p->text_spans, p->batch, p->seqlen, p->seqlen_k)) != TACA_OK)
        return st;
    nrows = p->batch * p->heads * p->seqlen;
    work = (double)nrows * (double)p->seqlen_k * (double)p->head_dim;
    delta = (double *)malloc((size_t)nrows * sizeof(double));
    if (!delta) return TACA_ERR_ALLOC;
    delta_portable(p, delta, taca_threads(p->num_threads, nrows, work));
#if TACA_CPU_AVX2
    taca_cpu_select_simd();
    if (p->dtype == TACA_F32 && taca_cpu_has_avx2()) {
        const int64_t ntile = (p->seqlen + TACA_T - 1) / TACA_T;
        st = bwd_f32(p, delta, taca_threads(p->num_threads, p->batch * p->heads * ntile, work));
        free(delta);
        return st;
    }
#endif
    bwd_portable(p, delta, taca_threads(p->num_threads, nrows, work));
    free(delta);
    return TACA_OK;
}
