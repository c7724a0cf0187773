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
 * No atomics, no N x N storage, deterministic: pass 0 computes delta (B, H, N) into malloc'd
 * scratch; pass 1 runs over (b, h, key tile) and owns dK, dV of its keys; pass 2 runs over
 * (b, h, query tile) and owns dQ of its queries (S and P are recomputed in both passes).
 *
 * Two implementations, as in the forward: float32 with AVX2+FMA (tiles packed into per-thread
 * aligned scratch, register-blocked micro-kernels, float accumulation) and a portable one
 * (float64 always, float32 without AVX2; one row per task, double accumulation).
 *
 * Shapes: q, k, v, out, dout, dq, dk, dv: (B, N, H, D), element strides (b, n, h), D contiguous.
 *         lse: (B, H, N) contiguous, float (F32) or double (F64).
 * Scratch: B*H*N accumulation-type values for delta plus per-thread tiles, all from malloc;
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

/* dK_j, dV_j for key j of (b, h). */
static void bwd_key_portable(const taca_bwd_params *p, const double *delta, int64_t b, int64_t h,
                             int64_t j, double *kj, double *vj, double *dk, double *dv) {
    const int f64 = p->dtype == TACA_F64;
    const int64_t N = p->seqlen, D = p->head_dim, tb = p->text_begin, te = p->text_end;
    const int key_text = taca_is_text(j, tb, te);
    const int64_t row0 = (b * p->heads + h) * N;
    double ct, cv;
    int64_t i, d;

    taca_row_load(p->k, taca_off(&p->k_stride, b, j, h), D, f64, kj);
    taca_row_load(p->v, taca_off(&p->v_stride, b, j, h), D, f64, vj);
    for (d = 0; d < D; ++d) dk[d] = dv[d] = 0.0;
    for (i = 0; i < N; ++i) {
        const int64_t qo = taca_off(&p->q_stride, b, i, h), go = taca_off(&p->dout_stride, b, i, h);
        double c, s, pr, dp, ds;
        taca_row_mults(taca_is_text(i, tb, te), p->scale, p->gamma[b], p->gamma_reverse, &ct, &cv);
        c = key_text ? ct : cv;
        s = taca_row_dot(kj, p->q, qo, D, f64) * c;
        pr = exp(s - taca_vec_load(p->lse, row0 + i, f64));
        dp = taca_row_dot(vj, p->dout, go, D, f64);
        ds = pr * (dp - delta[row0 + i]);
        taca_row_axpy(pr, p->dout, go, D, f64, dv);
        taca_row_axpy(ds * c, p->q, qo, D, f64, dk);
    }
    taca_row_store(p->dk, taca_off(&p->dk_stride, b, j, h), D, f64, dk, 1.0);
    taca_row_store(p->dv, taca_off(&p->dv_stride, b, j, h), D, f64, dv, 1.0);
}

/* dQ_i for query i of (b, h). */
static void bwd_query_portable(const taca_bwd_params *p, const double *delta, int64_t b,
                               int64_t h, int64_t i, double *qi, double *gi, double *dq) {
    const int f64 = p->dtype == TACA_F64;
    const int64_t N = p->seqlen, D = p->head_dim, tb = p->text_begin, te = p->text_end;
    const int64_t row = (b * p->heads + h) * N + i;
    const double lse = taca_vec_load(p->lse, row, f64), dl = delta[row];
    double ct, cv;
    int64_t j, d;

    taca_row_mults(taca_is_text(i, tb, te), p->scale, p->gamma[b], p->gamma_reverse, &ct, &cv);
    taca_row_load(p->q, taca_off(&p->q_stride, b, i, h), D, f64, qi);
    taca_row_load(p->dout, taca_off(&p->dout_stride, b, i, h), D, f64, gi);
    for (d = 0; d < D; ++d) dq[d] = 0.0;
    for (j = 0; j < N; ++j) {
        const int64_t ko = taca_off(&p->k_stride, b, j, h);
        const double c = taca_is_text(j, tb, te) ? ct : cv;
        const double s = taca_row_dot(qi, p->k, ko, D, f64) * c;
        const double pr = exp(s - lse);
        const double dp = taca_row_dot(gi, p->v, taca_off(&p->v_stride, b, j, h), D, f64);
        taca_row_axpy(pr * (dp - dl) * c, p->k, ko, D, f64, dq);
    }
    taca_row_store(p->dq, taca_off(&p->dq_stride, b, i, h), D, f64, dq, 1.0);
}

static int bwd_portable(const taca_bwd_params *p, int nt) {
    const int64_t H = p->heads, N = p->seqlen;
    const int64_t ntask = p->batch * H * N;
    double *delta = (double *)malloc((size_t)ntask * sizeof(double));
    int64_t t;
    if (!delta) return TACA_ERR_ALLOC;
    delta_portable(p, delta, nt);
#pragma omp parallel num_threads(nt)
    {
        double a[TACA_MAX_HEAD_DIM], c[TACA_MAX_HEAD_DIM], e[TACA_MAX_HEAD_DIM],
            f[TACA_MAX_HEAD_DIM];
#pragma omp for schedule(static)
        for (t = 0; t < ntask; ++t) {
            int64_t bh = t / N;
            bwd_key_portable(p, delta, bh / H, bh % H, t % N, a, c, e, f);
        }
#pragma omp for schedule(static)
        for (t = 0; t < ntask; ++t) {
            int64_t bh = t / N;
            bwd_query_portable(p, delta, bh / H, bh % H, t % N, a, c, e);
        }
    }
    free(delta);
    return TACA_OK;
}

int taca_bwd_cpu(const taca_bwd_params *p) {
    int st = taca_check_bwd(p);
    if (st != TACA_OK) return st;
    if (p->dtype != TACA_F32 && p->dtype != TACA_F64) return TACA_ERR_DTYPE;
    if (p->batch * p->seqlen * p->heads == 0) return TACA_OK;
    if ((st = taca_check_gamma_host(p->gamma, p->batch)) != TACA_OK) return st;
    return bwd_portable(p, taca_threads(p->num_threads));
}
