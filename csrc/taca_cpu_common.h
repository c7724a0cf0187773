/*
 * taca_cpu_common.h: helpers shared by taca_fwd_cpu.c and taca_bwd_cpu.c (not part of the ABI).
 *
 * Addressing: element (b, n, h, d) of a (B, N, H, D) tensor with element strides s lives at
 * base + b*s.b + n*s.n + h*s.h + d. lse/text_mass/delta are contiguous (B, H, N).
 * The logit multiplier of DESIGN.md section 1 is folded with scale: for query row i the
 * logit of key j is (q_i . k_j) * c, c = scale * m_ij, which takes only two values per row:
 * one for text keys and one for visual keys.
 */
#ifndef TACA_CPU_COMMON_H_
#define TACA_CPU_COMMON_H_

#include "taca.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TACA_CPU_AVX2 1
#else
#define TACA_CPU_AVX2 0
#endif

static inline int64_t taca_off(const taca_strides *s, int64_t b, int64_t n, int64_t h) {
    return b * s->b + n * s->n + h * s->h;
}

static inline int taca_is_text(int64_t i, int64_t tb, int64_t te) { return i >= tb && i < te; }

/* Multipliers (scale folded in) of row i for text keys (*ct) and visual keys (*cv). */
static inline void taca_row_mults(int is_text_row, double scale, double gamma, double gamma_rev,
                                  double *ct, double *cv) {
    if (is_text_row) {
        *ct = scale;
        *cv = scale * gamma_rev;
    } else {
        *ct = scale * gamma;
        *cv = scale;
    }
}

/* Resolved OpenMP thread count: num_threads <= 0 means the runtime default. */
static inline int taca_threads(int num_threads) {
#ifdef _OPENMP
    return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
    (void)num_threads;
    return 1;
#endif
}

static inline int taca_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Validates the per-sample host gamma array: every element finite and > 0. */
static inline int taca_check_gamma_host(const float *gamma, int64_t batch) {
    int64_t b;
    for (b = 0; b < batch; ++b)
        if (!isfinite(gamma[b]) || !(gamma[b] > 0.0f)) return TACA_ERR_GAMMA;
    return TACA_OK;
}

/* 64-byte aligned allocation on top of malloc (C99 has no aligned_alloc). */
static inline void *taca_aligned_malloc(size_t bytes, void **raw) {
    uintptr_t p;
    *raw = malloc(bytes + 64);
    if (!*raw) return NULL;
    p = ((uintptr_t)*raw + 63) & ~(uintptr_t)63;
    return (void *)p;
}

#if TACA_CPU_AVX2
/*
 * exp of 8 floats, for arguments <= ~88 (the kernels only pass x - rowmax <= 0).
 * Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial:
 * truncation error < 6e-9 relative, so the result is within a few ulp of expf.
 * NaN stays NaN; x < -87 (including -inf) gives exactly 0.
 */
static inline __m256 taca_exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 hi = _mm256_set1_ps(88.0f);
    __m256 xc = _mm256_max_ps(lo, x); /* NaN in x is returned as is */
    __m256 n, r, p;
    __m256i e;
    xc = _mm256_min_ps(hi, xc);
    n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    e = _mm256_cvtps_epi32(n);
    e = _mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_blendv_ps(p, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
}

static inline float taca_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Max of 8 floats; a NaN lane makes the result NaN (max_ps alone could drop it). */
static inline float taca_hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    float out;
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    out = _mm_cvtss_f32(m);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) out = NAN;
    return out;
}
#endif

/*
 * Row helpers of the portable path (float64 inputs, and float32 without AVX2): rows are
 * read from float or double storage and computed in double.
 */
static inline void taca_row_load(const void *base, int64_t off, int64_t D, int f64, double *dst) {
    int64_t d;
    if (f64) {
        const double *x = (const double *)base + off;
        for (d = 0; d < D; ++d) dst[d] = x[d];
    } else {
        const float *x = (const float *)base + off;
        for (d = 0; d < D; ++d) dst[d] = x[d];
    }
}

static inline double taca_row_dot(const double *a, const void *base, int64_t off, int64_t D,
                                  int f64) {
    double s = 0.0;
    int64_t d;
    if (f64) {
        const double *x = (const double *)base + off;
        for (d = 0; d < D; ++d) s += a[d] * x[d];
    } else {
        const float *x = (const float *)base + off;
        for (d = 0; d < D; ++d) s += a[d] * (double)x[d];
    }
    return s;
}

static inline void taca_row_axpy(double alpha, const void *base, int64_t off, int64_t D, int f64,
                                 double *acc) {
    int64_t d;
    if (f64) {
        const double *x = (const double *)base + off;
        for (d = 0; d < D; ++d) acc[d] += alpha * x[d];
    } else {
        const float *x = (const float *)base + off;
        for (d = 0; d < D; ++d) acc[d] += alpha * (double)x[d];
    }
}

static inline void taca_row_store(void *base, int64_t off, int64_t D, int f64, const double *src,
                                  double mul) {
    int64_t d;
    if (f64) {
        double *x = (double *)base + off;
        for (d = 0; d < D; ++d) x[d] = src[d] * mul;
    } else {
        float *x = (float *)base + off;
        for (d = 0; d < D; ++d) x[d] = (float)(src[d] * mul);
    }
}

static inline double taca_vec_load(const void *base, int64_t idx, int f64) {
    return f64 ? ((const double *)base)[idx] : (double)((const float *)base)[idx];
}

static inline void taca_vec_store(void *base, int64_t idx, int f64, double v) {
    if (f64)
        ((double *)base)[idx] = v;
    else
        ((float *)base)[idx] = (float)v;
}

#endif /* TACA_CPU_COMMON_H_ */
