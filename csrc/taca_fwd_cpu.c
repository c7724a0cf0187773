/*
 * taca_fwd_cpu.c: CPU forward of gamma-scaled joint attention (TACA), float32 and float64.
 *
 * Algorithm (FlashAttention-style online softmax, nothing of size N x N is stored):
 *   for each (b, h) and each query i:  c_ij = scale * m_ij  (two values per row, see header)
 *     running max m, running sum l, accumulator o (D), text mass t
 *     for each key block J: s_j = (q_i . k_j) c_ij;  m' = max(m, max_J s);  a = exp(m - m')
 *       l = a l + sum_J exp(s_j - m');  o = a o + sum_J exp(s_j - m') v_j;  t likewise over text j
 *     out_i = o / l;  lse_i = m + log l;  text_mass_i = t / l
 * A row whose max is -inf subtracts 0 instead (no inf - inf); NaN anywhere in a row's inputs
 * gives NaN in that row's outputs, as the materialized reference does.
 *
 * Two implementations of the same recurrence:
 *   - float32 with AVX2+FMA (x86-64 built with -march=native): T = TACA_T = 96 queries per
 *     task; per key tile of T keys the logits are computed transposed, S^T = K Q^T, from K
 *     rows in place and two packed copies of Q^T scaled by the row multipliers (text keys /
 *     visual keys: the GEMM is split at the text range, so gamma costs nothing inside it);
 *     the softmax statistics of 8 queries live in one vector; O += P V reads V rows in place
 *     (a padded copy only when D % 8 != 0). 6 x 16 register-blocked FMA micro-kernel, a
 *     polynomial exp (taca_cpu_common.h). Accumulates in float.
 *   - portable (float64 always, float32 without AVX2): one query row per task, key blocks of
 *     64, accumulates in double.
 * OpenMP over (batch, head, query tile); each task writes disjoint outputs: deterministic.
 * Problems under ~2.6e5 multiply-adds per GEMM run on the calling thread (taca_threads).
 *
 * Versions (float32, one AMD EPYC Zen 3 core at ~2.45 GHz, AVX2 peak ~78 GFLOP/s; B=1, H=2..8,
 * N=1152 with 128 text tokens; torch 2.13 F.scaled_dot_product_attention without gamma on
 * the same core: ~67 GFLOP/s at D=64, ~76 at D=128; CPU-time minima, the machine was shared):
 *   v1 portable row-wise, double accumulation        ~1.5 GFLOP/s
 *   v2 tiles 48, S = Q K^T with K^T packed per pair  25 (D=64) / 28 (D=128)
 *   v3 S^T = K Q^T, Q^T packed once per query tile   38 / 28; tile 96: ~65 / ~76
 *   v4 gamma folded into two scaled Q^T (no multiply pass), cheaper exp: 65-67 / 76
 * The GEMM micro-kernel alone runs at 76-82 GFLOP/s; exp is ~13% (D=64) / ~7% (D=128) of it.
 *
 * Shapes: q, out: (B, N_q, H, D); k, v: (B, N_k, H_kv, D) (query head h reads kv head
 *         h / (H / H_kv), in place); element strides (b, n, h), D contiguous.
 *         lse, text_mass: (B, H, N_q) contiguous, float (F32) or double (F64); may be NULL.
 * Spans: per sample (text_spans) or shared; the query span picks the row multipliers, the key
 * span splits the logit GEMM. Masks are added to the logit tile after scale and gamma (the
 * portable path adds them per element). A fully masked row (every logit -inf) is written as
 * out 0, lse -inf, text_mass 0: the AVX2 exp clamps at -87, so its ~1e-38 weights are
 * discarded by that test rather than computed.
 * Build: part of libtaca_core (setup.py): cc -O3 -std=c99 -fopenmp -march=native.
 */
#include "taca_cpu_common.h"

#define PORT_BLOCK 64

/* A fully masked row (every logit -inf): out 0, lse -inf, text_mass 0. */
static void fwd_store_dead_row(const taca_fwd_params *p, int f64, int64_t b, int64_t h,
                               int64_t i) {
    const int64_t row = (b * p->heads + h) * p->seqlen + i;
    int64_t d;
    if (f64) {
        double *o = (double *)p->out + taca_off(&p->out_stride, b, i, h);
        for (d = 0; d < p->head_dim; ++d) o[d] = 0.0;
    } else {
        float *o = (float *)p->out + taca_off(&p->out_stride, b, i, h);
        for (d = 0; d < p->head_dim; ++d) o[d] = 0.0f;
    }
    if (p->lse) taca_vec_store(p->lse, row, f64, -INFINITY);
    if (p->text_mass) taca_vec_store(p->text_mass, row, f64, 0.0);
}

static void fwd_row_portable(const taca_fwd_params *p, int64_t b, int64_t h, int64_t i,
                             double *q, double *acc) {
    const int f64 = p->dtype == TACA_F64;
    const int64_t N = p->seqlen_k, D = p->head_dim;
    const int64_t hk = taca_kv_head(h, p->heads, p->heads_kv);
    const taca_span sp = TACA_SPAN_OF(p, b);
    const int masked = p->mask.kind != TACA_MASK_NONE;
    double s[PORT_BLOCK];
    double ct, cv, m = -INFINITY, l = 0.0, tm = 0.0, m_use = 0.0;
    int64_t j0, j, d;

    taca_row_mults(taca_is_text(i, sp.qb, sp.qe), p->scale, taca_gamma_at(p->gamma, f64, b),
                   p->gamma_reverse, &ct, &cv);
    taca_row_load(p->q, taca_off(&p->q_stride, b, i, h), D, f64, q);
    for (d = 0; d < D; ++d) acc[d] = 0.0;
    for (j0 = 0; j0 < N; j0 += PORT_BLOCK) {
        const int64_t j1 = j0 + PORT_BLOCK < N ? j0 + PORT_BLOCK : N;
        double bm = -INFINITY, m_new, alpha;
        for (j = j0; j < j1; ++j) {
            double c = taca_is_text(j, sp.kb, sp.ke) ? ct : cv;
            double x = taca_row_dot(q, p->k, taca_off(&p->k_stride, b, j, hk), D, f64) * c;
            if (masked) x += taca_mask_at(&p->mask, f64, b, h, i, j);
            s[j - j0] = x;
            if (x > bm) bm = x;
        }
        m_new = bm > m ? bm : m;
        m_use = m_new == -INFINITY ? 0.0 : m_new;
        alpha = exp(m - m_use);
        l *= alpha;
        tm *= alpha;
        for (d = 0; d < D; ++d) acc[d] *= alpha;
        for (j = j0; j < j1; ++j) {
            double e = exp(s[j - j0] - m_use);
            l += e;
            if (taca_is_text(j, sp.kb, sp.ke)) tm += e;
            taca_row_axpy(e, p->v, taca_off(&p->v_stride, b, j, hk), D, f64, acc);
        }
        m = m_new;
    }
    if (l == 0.0) { /* every logit -inf (a NaN logit makes l NaN and the row NaN instead) */
        fwd_store_dead_row(p, f64, b, h, i);
        return;
    }
    taca_row_store(p->out, taca_off(&p->out_stride, b, i, h), D, f64, acc, 1.0 / l);
    if (p->lse) taca_vec_store(p->lse, (b * p->heads + h) * p->seqlen + i, f64, m_use + log(l));
    if (p->text_mass) taca_vec_store(p->text_mass, (b * p->heads + h) * p->seqlen + i, f64, tm / l);
}

static int fwd_portable(const taca_fwd_params *p) {
    const int64_t B = p->batch, H = p->heads, N = p->seqlen;
    const int64_t ntask = B * H * N;
    int64_t t;
    int nt = taca_threads(p->num_threads, ntask,
                          (double)ntask * (double)p->seqlen_k * (double)p->head_dim);
    (void)nt;
#pragma omp parallel num_threads(nt)
    {
        double q[TACA_MAX_HEAD_DIM], acc[TACA_MAX_HEAD_DIM];
#pragma omp for schedule(static)
        for (t = 0; t < ntask; ++t) {
            int64_t i = t % N, bh = t / N;
            fwd_row_portable(p, bh / H, bh % H, i, q, acc);
        }
    }
    return TACA_OK;
}

#if TACA_CPU_AVX2
TACA_AVX2_BEGIN
/*
 * Tiled float32 forward. Per query tile the logits are computed transposed, S^T = K Q^T
 * (keys x queries), so that Q^T is packed once per query tile, K is read in place, and the
 * softmax statistics of 8 queries sit in one vector (no horizontal reductions).
 */
typedef struct {
    float *qv, *qt;  /* (D, T) query tile transposed, times the visual-key / text-key multiplier */
    float *v;        /* (T, Dp) value tile, only when D % 8 != 0 */
    float *st;       /* (T keys, T queries) logits, then probabilities */
    float *o;        /* (T, Dp) unnormalized output */
    float *m, *l, *tm, *alpha, *ct, *cv; /* (T,) each, per query */
} fwd_scratch;

static float *fwd_scratch_init(fwd_scratch *w, int64_t D, void **raw) {
    const int64_t T = TACA_T, Dp = taca_pad8(D);
    float *base = (float *)taca_aligned_malloc(
        (size_t)(2 * D * T + 2 * T * Dp + T * T + 6 * T) * sizeof(float), raw);
    if (!base) return NULL;
    w->qv = base;
    w->qt = w->qv + D * T;
    w->v = w->qt + D * T;
    w->o = w->v + T * Dp;
    w->st = w->o + T * Dp;
    w->m = w->st + T * T;
    w->l = w->m + T;
    w->tm = w->l + T;
    w->alpha = w->tm + T;
    w->ct = w->alpha + T;
    w->cv = w->ct + T;
    return base;
}

/* st (nk keys x T queries) += the mask terms of queries n0 .. n0+nq, keys k0 .. k0+nk. */
static void fwd_add_mask(const taca_fwd_params *p, float *st, int64_t b, int64_t h, int64_t n0,
                         int nq, int64_t k0, int nk) {
    const taca_mask *m = &p->mask;
    int i, j;
    if (m->kind == TACA_MASK_BOOL) {
        for (j = 0; j < nk; ++j) {
            const unsigned char *mk = (const unsigned char *)m->data + b * m->b + h * m->h +
                                      (k0 + j) * m->k + n0 * m->q;
            for (i = 0; i < nq; ++i)
                if (!mk[i * m->q]) st[j * TACA_T + i] = -INFINITY;
        }
    } else {
        for (j = 0; j < nk; ++j) {
            const float *mk =
                (const float *)m->data + b * m->b + h * m->h + (k0 + j) * m->k + n0 * m->q;
            for (i = 0; i < nq; ++i) st[j * TACA_T + i] += mk[i * m->q];
        }
    }
}

/* The online softmax over one key tile (st: nk keys x T queries of logits, replaced by their exponentials) for the
 * tile's T queries, 8 a vector: the running max, sum, text sum and the rescale factor alpha of each query. */
static void fwd_softmax_256(fwd_scratch *w, int nk, int64_t k0, int64_t tb, int64_t te) {
    const int T = TACA_T;
    const __m256 ninf = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps();
    int iv, j;
    for (iv = 0; iv < T; iv += 8) {
        const __m256 m_old = _mm256_load_ps(w->m + iv);
        __m256 bm = ninf, m_new, m_use, alpha, sum = zero, tsum = zero;
        for (j = 0; j < nk; ++j) bm = _mm256_max_ps(_mm256_load_ps(w->st + j * T + iv), bm);
        m_new = _mm256_max_ps(bm, m_old);
        m_use = _mm256_blendv_ps(m_new, zero, _mm256_cmp_ps(m_new, ninf, _CMP_EQ_OQ));
        alpha = taca_exp256(_mm256_sub_ps(m_old, m_use));
        for (j = 0; j < nk; ++j) {
            float *x = w->st + j * T + iv;
            __m256 e = taca_exp256(_mm256_sub_ps(_mm256_load_ps(x), m_use));
            _mm256_store_ps(x, e);
            sum = _mm256_add_ps(sum, e);
            if (taca_is_text(k0 + j, tb, te)) tsum = _mm256_add_ps(tsum, e);
        }
        _mm256_store_ps(w->l + iv, _mm256_fmadd_ps(_mm256_load_ps(w->l + iv), alpha, sum));
        _mm256_store_ps(w->tm + iv, _mm256_fmadd_ps(_mm256_load_ps(w->tm + iv), alpha, tsum));
        _mm256_store_ps(w->m + iv, m_new);
        _mm256_store_ps(w->alpha + iv, alpha);
    }
}

/* The first nq rows of the output accumulator (T x Dp) times their alpha. */
static void fwd_rescale_256(fwd_scratch *w, int nq, int64_t Dp) {
    int i;
    int64_t d;
    for (i = 0; i < nq; ++i) {
        const __m256 a = _mm256_set1_ps(w->alpha[i]);
        float *orow = w->o + i * Dp;
        for (d = 0; d < Dp; d += 8) _mm256_store_ps(orow + d, _mm256_mul_ps(_mm256_load_ps(orow + d), a));
    }
}

#if TACA_CPU_AVX512
/* fwd_softmax_256 with 16 queries a vector (T % 16 == 0): the same operations lane by lane (bitwise). */
TACA_TARGET_AVX512 static void fwd_softmax_512(fwd_scratch *w, int nk, int64_t k0, int64_t tb, int64_t te) {
    const int T = TACA_T;
    const __m512 ninf = _mm512_set1_ps(-INFINITY), zero = _mm512_setzero_ps();
    int iv, j;
    for (iv = 0; iv < T; iv += 16) {
        const __m512 m_old = _mm512_load_ps(w->m + iv);
        __m512 bm = ninf, m_new, m_use, alpha, sum = zero, tsum = zero;
        for (j = 0; j < nk; ++j) bm = _mm512_max_ps(_mm512_load_ps(w->st + j * T + iv), bm);
        m_new = _mm512_max_ps(bm, m_old);
        m_use = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ), m_new, zero);
        alpha = taca_exp512(_mm512_sub_ps(m_old, m_use));
        for (j = 0; j < nk; ++j) {
            float *x = w->st + j * T + iv;
            __m512 e = taca_exp512(_mm512_sub_ps(_mm512_load_ps(x), m_use));
            _mm512_store_ps(x, e);
            sum = _mm512_add_ps(sum, e);
            if (taca_is_text(k0 + j, tb, te)) tsum = _mm512_add_ps(tsum, e);
        }
        _mm512_store_ps(w->l + iv, _mm512_fmadd_ps(_mm512_load_ps(w->l + iv), alpha, sum));
        _mm512_store_ps(w->tm + iv, _mm512_fmadd_ps(_mm512_load_ps(w->tm + iv), alpha, tsum));
        _mm512_store_ps(w->m + iv, m_new);
        _mm512_store_ps(w->alpha + iv, alpha);
    }
}

/* fwd_rescale_256 with 16-float vectors (an 8-float masked tail where Dp % 16 == 8). */
TACA_TARGET_AVX512 static void fwd_rescale_512(fwd_scratch *w, int nq, int64_t Dp) {
    int i;
    int64_t d;
    for (i = 0; i < nq; ++i) {
        const __m512 a = _mm512_set1_ps(w->alpha[i]);
        float *orow = w->o + i * Dp;
        for (d = 0; d < Dp; d += 16) {
            const __mmask16 m = Dp - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
            _mm512_mask_storeu_ps(orow + d, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, orow + d), a));
        }
    }
}
#endif

/* One query tile of (b, h): rows n0 .. n0+nq. */
static void fwd_tile_f32(const taca_fwd_params *p, fwd_scratch *w, int64_t b, int64_t h,
                         int64_t n0, int nq) {
    const int64_t N = p->seqlen_k, D = p->head_dim, Dp = taca_pad8(D), T = TACA_T;
    const int64_t hk = taca_kv_head(h, p->heads, p->heads_kv);
    const taca_span sp = TACA_SPAN_OF(p, b);
    const int64_t tb = sp.kb, te = sp.ke;
    int64_t k0, d, ldv;
    int i;

    taca_pack_q_scaled((const float *)p->q, &p->q_stride, b, h, n0, nq, D, sp.qb, sp.qe, p->scale,
                       taca_gamma_at(p->gamma, 0, b), p->gamma_reverse, w->qt, w->qv, w->ct,
                       w->cv);
    for (i = 0; i < T; ++i) {
        w->m[i] = -INFINITY;
        w->l[i] = 0.0f;
        w->tm[i] = 0.0f;
    }
    memset(w->o, 0, (size_t)(T * Dp) * sizeof(float));
    for (k0 = 0; k0 < N; k0 += T) {
        const int nk = (int)(N - k0 < T ? N - k0 : T);
        const float *vop;
        taca_logits_t((const float *)p->k, &p->k_stride, b, hk, k0, nk, D, tb, te, w->qt, w->qv,
                      w->st);
        if (p->mask.kind != TACA_MASK_NONE) fwd_add_mask(p, w->st, b, h, n0, nq, k0, nk);
#if TACA_CPU_AVX512
        if (taca_use_avx512) {
            fwd_softmax_512(w, nk, k0, tb, te);
            if (k0 > 0) fwd_rescale_512(w, nq, Dp);
        } else
#endif
        {
            fwd_softmax_256(w, nk, k0, tb, te);
            if (k0 > 0) fwd_rescale_256(w, nq, Dp);
        }
        vop = taca_rows_operand((const float *)p->v, &p->v_stride, b, hk, k0, nk, D, w->v, &ldv);
        taca_gemm_f32((int)T, (int)Dp, nk, w->st, 1, T, vop, ldv, w->o, Dp, 1);
    }
    for (i = 0; i < nq; ++i) {
        const int64_t row = (b * p->heads + h) * p->seqlen + n0 + i;
        const float inv = 1.0f / w->l[i], m_use = w->m[i] == -INFINITY ? 0.0f : w->m[i];
        float *dst = (float *)p->out + taca_off(&p->out_stride, b, n0 + i, h);
        if (w->m[i] == -INFINITY && w->l[i] == w->l[i]) {
            /* fully masked (taca_exp256 gave its masked keys ~1e-38, not 0): out 0, lse -inf;
             * a NaN logit leaves m at -inf too, but makes l NaN: that row stays NaN */
            for (d = 0; d < D; ++d) dst[d] = 0.0f;
            if (p->lse) ((float *)p->lse)[row] = -INFINITY;
            if (p->text_mass) ((float *)p->text_mass)[row] = 0.0f;
            continue;
        }
        for (d = 0; d < D; ++d) dst[d] = w->o[i * Dp + d] * inv;
        if (p->lse) ((float *)p->lse)[row] = m_use + logf(w->l[i]);
        if (p->text_mass) ((float *)p->text_mass)[row] = w->tm[i] * inv;
    }
}

static int fwd_f32(const taca_fwd_params *p) {
    const int64_t H = p->heads, N = p->seqlen, T = TACA_T;
    const int64_t ntile = (N + T - 1) / T, ntask = p->batch * H * ntile;
    int failed = 0, nt = taca_threads(p->num_threads, ntask,
                                       (double)p->batch * H * N * p->seqlen_k * p->head_dim);
    (void)nt;
#pragma omp parallel num_threads(nt)
    {
        fwd_scratch w;
        void *raw = NULL;
        int64_t t;
        memset(&w, 0, sizeof(w));
        if (!fwd_scratch_init(&w, p->head_dim, &raw)) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (t = 0; t < ntask; ++t) {
                const int64_t bh = t / ntile, n0 = (t % ntile) * T;
                fwd_tile_f32(p, &w, bh / H, bh % H, n0, (int)(N - n0 < T ? N - n0 : T));
            }
        }
        free(raw);
    }
    return failed ? TACA_ERR_ALLOC : TACA_OK;
}
TACA_AVX2_END
#endif

int taca_fwd_cpu(const taca_fwd_params *p) {
    int st = taca_check_fwd(p);
    if (st != TACA_OK) return st;
    if (p->dtype != TACA_F32 && p->dtype != TACA_F64) return TACA_ERR_DTYPE;
    if (p->batch * p->seqlen * p->heads == 0) return TACA_OK;
    if ((st = taca_check_gamma_host(p->gamma, p->dtype == TACA_F64, p->batch)) != TACA_OK)
        return st;
    if ((st = taca_check_spans_host(p->text_spans, p->batch, p->seqlen, p->seqlen_k)) != TACA_OK)
        return st;
#if TACA_CPU_AVX2
    taca_cpu_select_simd();
    if (p->dtype == TACA_F32 && taca_cpu_has_avx2()) return fwd_f32(p);
#endif
    return fwd_portable(p);
}
