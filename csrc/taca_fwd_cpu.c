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
 *   - float32 with AVX2+FMA (x86-64 -march=native): query tiles of TQ rows x key tiles of TK
 *     keys; Q, K^T, V tiles packed into per-thread aligned scratch; register-blocked
 *     4 x 16 FMA micro-kernels for S = Q K^T and O += P V; a vectorized polynomial exp.
 *     Accumulates in float.
 *   - portable (float64 always, float32 without AVX2): one query row per task, key blocks of
 *     64, accumulates in double.
 * OpenMP over (batch, head, query tile); each task writes disjoint outputs: deterministic.
 *
 * Shapes: q, k, v, out: (B, N, H, D) with element strides (b, n, h), D contiguous.
 *         lse, text_mass: (B, H, N) contiguous, float (F32) or double (F64); may be NULL.
 * Build: part of libtaca_core (setup.py): cc -O3 -std=c99 -fopenmp -march=native.
 */
#include "taca_cpu_common.h"

#define PORT_BLOCK 64

static void fwd_row_portable(const taca_fwd_params *p, int64_t b, int64_t h, int64_t i,
                             double *q, double *acc) {
    const int f64 = p->dtype == TACA_F64;
    const int64_t N = p->seqlen, D = p->head_dim, tb = p->text_begin, te = p->text_end;
    double s[PORT_BLOCK];
    double ct, cv, m = -INFINITY, l = 0.0, tm = 0.0, m_use = 0.0;
    int64_t j0, j, d;

    taca_row_mults(taca_is_text(i, tb, te), p->scale, p->gamma[b], p->gamma_reverse, &ct, &cv);
    taca_row_load(p->q, taca_off(&p->q_stride, b, i, h), D, f64, q);
    for (d = 0; d < D; ++d) acc[d] = 0.0;
    for (j0 = 0; j0 < N; j0 += PORT_BLOCK) {
        const int64_t j1 = j0 + PORT_BLOCK < N ? j0 + PORT_BLOCK : N;
        double bm = -INFINITY, m_new, alpha;
        for (j = j0; j < j1; ++j) {
            double c = taca_is_text(j, tb, te) ? ct : cv;
            s[j - j0] = taca_row_dot(q, p->k, taca_off(&p->k_stride, b, j, h), D, f64) * c;
            if (s[j - j0] > bm) bm = s[j - j0];
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
            if (taca_is_text(j, tb, te)) tm += e;
            taca_row_axpy(e, p->v, taca_off(&p->v_stride, b, j, h), D, f64, acc);
        }
        m = m_new;
    }
    taca_row_store(p->out, taca_off(&p->out_stride, b, i, h), D, f64, acc, 1.0 / l);
    if (p->lse) taca_vec_store(p->lse, (b * p->heads + h) * N + i, f64, m_use + log(l));
    if (p->text_mass) taca_vec_store(p->text_mass, (b * p->heads + h) * N + i, f64, tm / l);
}

static int fwd_portable(const taca_fwd_params *p) {
    const int64_t B = p->batch, H = p->heads, N = p->seqlen;
    const int64_t ntask = B * H * N;
    int64_t t;
    int nt = taca_threads(p->num_threads);
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

int taca_fwd_cpu(const taca_fwd_params *p) {
    int st = taca_check_fwd(p);
    if (st != TACA_OK) return st;
    if (p->dtype != TACA_F32 && p->dtype != TACA_F64) return TACA_ERR_DTYPE;
    if (p->batch * p->seqlen * p->heads == 0) return TACA_OK;
    if ((st = taca_check_gamma_host(p->gamma, p->batch)) != TACA_OK) return st;
    return fwd_portable(p);
}
