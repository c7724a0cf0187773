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

/*
 * The float32 fast path needs AVX2 + FMA. Built with them (-march=native on such a CPU) it is
 * always taken; built without them by GCC for x86 (TACA_NATIVE=0), its functions are compiled
 * for AVX2 + FMA anyway (TACA_AVX2_BEGIN/END) and taken when the CPU has them at run time;
 * elsewhere float32 runs the portable path.
 */
#if defined(__AVX2__) && defined(__FMA__)
#define TACA_CPU_AVX2 1
#define TACA_AVX2_RUNTIME 0
#elif defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define TACA_CPU_AVX2 1
#define TACA_AVX2_RUNTIME 1
#else
#define TACA_CPU_AVX2 0
#define TACA_AVX2_RUNTIME 0
#endif

#if TACA_AVX2_RUNTIME
#define TACA_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define TACA_AVX2_END _Pragma("GCC pop_options")
#else
#define TACA_AVX2_BEGIN
#define TACA_AVX2_END
#endif

#if TACA_CPU_AVX2
#include <immintrin.h>
#endif

/*
 * AVX-512F for the float32 path's GEMM micro-kernel (taca_gemm_f32), chosen per call where the CPU has it: its
 * function is compiled for AVX-512F by a target attribute whatever -march says (x86 GCC / Clang), and each C
 * element is the same chain of fused multiply-adds over k as in the AVX2 kernel, so the outputs are bitwise the
 * same. On the AVX-512 AMD EPYC of the development machine (one thread, the logit GEMM 96 x 96 x D) it ran at 116
 * GFLOP/s against the AVX2 kernel's 106 (D = 64) and 115 (D = 128): the AVX2 kernel is already near this core's FMA
 * peak, the gain is in instructions issued (broadcasts, loop control); the forward gained 4-7% end to end, the
 * backward nothing measurable (benchmarks/results/cpu_2026-12-08.md). TACA_CPU_AVX512=0 keeps AVX2 (read per call).
 */
#if TACA_CPU_AVX2 && (defined(__x86_64__) || defined(__i386__))
#define TACA_CPU_AVX512 1
#define TACA_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define TACA_CPU_AVX512 0
#endif
/* Set by taca_cpu_select_simd() at each op's entry, before any parallel region (one value per call). */
static int taca_use_avx512 __attribute__((unused));

static inline void taca_cpu_select_simd(void) {
#if TACA_CPU_AVX512
    const char *e = getenv("TACA_CPU_AVX512");
    taca_use_avx512 = !(e && e[0] == '0') && __builtin_cpu_supports("avx512f");
#endif
}

/* Whether the float32 fast path may run on this CPU (TACA_CPU_PORTABLE=1 forbids it: tests). */
static inline int taca_cpu_has_avx2(void) {
    const char *force = getenv("TACA_CPU_PORTABLE");
    if (force && force[0] == '1') return 0;
#if TACA_AVX2_RUNTIME
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return TACA_CPU_AVX2;
#endif
}

static inline int64_t taca_off(const taca_strides *s, int64_t b, int64_t n, int64_t h) {
    return b * s->b + n * s->n + h * s->h;
}

static inline int taca_is_text(int64_t i, int64_t tb, int64_t te) { return i >= tb && i < te; }

/* The text spans of sample b: keys [kb, ke), queries [qb, qe). */
typedef struct {
    int64_t kb, ke, qb, qe;
} taca_span;

#define TACA_SPAN_OF(p, b)                                                                     \
    ((p)->text_spans ? taca_span_at((p)->text_spans, (b))                                      \
                     : taca_span_make((p)->text_begin, (p)->text_end, (p)->q_text_begin,       \
                                      (p)->q_text_end))

static inline taca_span taca_span_make(int64_t kb, int64_t ke, int64_t qb, int64_t qe) {
    taca_span s;
    s.kb = kb;
    s.ke = ke;
    s.qb = qb;
    s.qe = qe;
    return s;
}

static inline taca_span taca_span_at(const int64_t *spans, int64_t b) {
    return taca_span_make(spans[4 * b], spans[4 * b + 1], spans[4 * b + 2], spans[4 * b + 3]);
}

/* Validates host per-sample spans against N_k (keys) and N_q (queries). */
static inline int taca_check_spans_host(const int64_t *spans, int64_t batch, int64_t nq,
                                        int64_t nk) {
    int64_t b;
    if (!spans) return TACA_OK;
    for (b = 0; b < batch; ++b) {
        const taca_span s = taca_span_at(spans, b);
        if (s.kb < 0 || s.kb > s.ke || s.ke > nk || s.qb < 0 || s.qb > s.qe || s.qe > nq)
            return TACA_ERR_TEXT_RANGE;
    }
    return TACA_OK;
}

/* The key/value head query head h reads (grouped KV heads). */
static inline int64_t taca_kv_head(int64_t h, int64_t heads, int64_t heads_kv) {
    return h / (heads / heads_kv);
}

/* The mask term of logit (b, h, i, j): 0 without a mask, -inf where a bool mask is 0. */
static inline double taca_mask_at(const taca_mask *m, int f64, int64_t b, int64_t h, int64_t i,
                                  int64_t j) {
    const int64_t off = b * m->b + h * m->h + i * m->q + j * m->k;
    if (m->kind == TACA_MASK_BOOL) return ((const unsigned char *)m->data)[off] ? 0.0 : -INFINITY;
    if (m->kind == TACA_MASK_ADD)
        return f64 ? ((const double *)m->data)[off] : (double)((const float *)m->data)[off];
    return 0.0;
}

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

/*
 * OpenMP thread count for a kernel of ntask independent tasks and about `work` multiply-adds
 * per GEMM-like product (B*H*N*N*D): num_threads <= 0 means the runtime default; never more
 * threads than tasks; small problems run on the calling thread, because starting a team
 * costs more than they do (and much more when the machine is oversubscribed).
 */
#define TACA_SERIAL_WORK 262144.0
static inline int taca_threads(int num_threads, int64_t ntask, double work) {
#ifdef _OPENMP
    int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
    if (work < TACA_SERIAL_WORK || ntask <= 1) return 1;
    if ((int64_t)nt > ntask) nt = (int)ntask;
    return nt < 1 ? 1 : nt;
#else
    (void)num_threads;
    (void)ntask;
    (void)work;
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

/* gamma[b] of the per-sample array (accumulation type: double for F64, float otherwise). */
static inline double taca_gamma_at(const void *gamma, int f64, int64_t b) {
    return f64 ? ((const double *)gamma)[b] : (double)((const float *)gamma)[b];
}

/* Validates the per-sample host gamma array: every element finite and > 0. */
static inline int taca_check_gamma_host(const void *gamma, int f64, int64_t batch) {
    int64_t b;
    for (b = 0; b < batch; ++b) {
        const double g = taca_gamma_at(gamma, f64, b);
        if (!isfinite(g) || !(g > 0.0)) return TACA_ERR_GAMMA;
    }
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
TACA_AVX2_BEGIN
/*
 * exp of 8 floats, meant for x <= 0 (the kernels pass x - rowmax or s - lse; x is clamped to
 * [-87, 88], so a bad lse cannot overflow the exponent bits): x = n ln2 + r, |r| <= ln2/2,
 * with n rounded by adding 1.5 * 2^23 + 127, so the low bits of that sum already hold the
 * biased exponent n + 127 (shifted into place: 2^n with no float->int conversion); two-step
 * Cody-Waite reduction and a degree-6 Taylor polynomial (truncation < 1.3e-7 relative; the
 * result is within a few ulp of expf). x < -87 is clamped to -87 (result ~1.6e-38 instead
 * of 0: negligible next to the row max's exp(0) = 1); NaN stays NaN.
 */
static inline __m256 taca_exp256(__m256 x) {
    const __m256 shift = _mm256_set1_ps(12583039.0f); /* 1.5 * 2^23 + 127 */
    __m256 t, n, r, p;
    /* max/min return their second operand when one is NaN: NaN in x is kept */
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
    t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shift);
    n = _mm256_sub_ps(t, shift);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
}

#if TACA_CPU_AVX512
/* taca_exp256 on 16 floats: the same operations lane by lane, so the same results bitwise. */
TACA_TARGET_AVX512 static inline __m512 taca_exp512(__m512 x) {
    const __m512 shift = _mm512_set1_ps(12583039.0f); /* 1.5 * 2^23 + 127 */
    __m512 t, n, r, p;
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
    t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shift);
    n = _mm512_sub_ps(t, shift);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23)));
}
#endif

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
TACA_AVX2_END
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

#if TACA_CPU_AVX2
TACA_AVX2_BEGIN
/*
 * Tiled float32 path (AVX2 + FMA). Tiles are TACA_T rows (queries) by TACA_T keys; head dims
 * are padded to Dp = round_up(D, 8) with zeros in packed tiles so every row is whole vectors.
 * TACA_T is a multiple of 6 (micro-kernel rows) and of 16 (micro-kernel columns).
 */
#ifndef TACA_T
#define TACA_T 96
#endif

static inline int64_t taca_pad8(int64_t d) { return (d + 7) & ~(int64_t)7; }


/*
 * C[M x Nc] = (acc ? C : 0) + A B with A(i, k) = A[i * ars + k * aks], B row-major (ldb), C
 * row-major (ldc), Nc % 8 == 0. Register block 6 x 16 (12 accumulators), then 8-column and
 * single-row tails. B and C rows are read as whole 8-float vectors up to Nc.
 */
#define TACA_MK_LOAD(r)                                                                        \
    x##r##0 = acc ? _mm256_loadu_ps(c0 + r * ldc + c) : _mm256_setzero_ps();                   \
    x##r##1 = acc ? _mm256_loadu_ps(c0 + r * ldc + c + 8) : _mm256_setzero_ps()
#define TACA_MK_FMA(r)                                                                         \
    a = _mm256_broadcast_ss(ak + r * ars);                                                     \
    x##r##0 = _mm256_fmadd_ps(a, b0, x##r##0);                                                 \
    x##r##1 = _mm256_fmadd_ps(a, b1, x##r##1)
#define TACA_MK_STORE(r)                                                                       \
    _mm256_storeu_ps(c0 + r * ldc + c, x##r##0);                                               \
    _mm256_storeu_ps(c0 + r * ldc + c + 8, x##r##1)

#if TACA_CPU_AVX512
/* taca_gemm_f32 with 16-float vectors: register block 6 x 32 (12 accumulators), then 16- or 8-column tails by
 * masked loads and stores (masked-off lanes are neither read nor written), then single rows. */
TACA_TARGET_AVX512 static void taca_gemm_f32_512(int M, int Nc, int K, const float *A, int64_t ars, int64_t aks,
                                                 const float *B, int64_t ldb, float *C, int64_t ldc, int acc) {
    int i = 0, c, k, r;
    for (; i + 6 <= M; i += 6) {
        const float *a0 = A + i * ars;
        float *c0 = C + i * ldc;
        for (c = 0; c + 32 <= Nc; c += 32) {
            __m512 x[12];
            for (r = 0; r < 6; ++r) {
                x[2 * r] = acc ? _mm512_loadu_ps(c0 + r * ldc + c) : _mm512_setzero_ps();
                x[2 * r + 1] = acc ? _mm512_loadu_ps(c0 + r * ldc + c + 16) : _mm512_setzero_ps();
            }
            for (k = 0; k < K; ++k) {
                const float *ak = a0 + k * aks;
                const __m512 b0 = _mm512_loadu_ps(B + k * ldb + c);
                const __m512 b1 = _mm512_loadu_ps(B + k * ldb + c + 16);
                for (r = 0; r < 6; ++r) {
                    const __m512 a = _mm512_set1_ps(ak[r * ars]);
                    x[2 * r] = _mm512_fmadd_ps(a, b0, x[2 * r]);
                    x[2 * r + 1] = _mm512_fmadd_ps(a, b1, x[2 * r + 1]);
                }
            }
            for (r = 0; r < 6; ++r) {
                _mm512_storeu_ps(c0 + r * ldc + c, x[2 * r]);
                _mm512_storeu_ps(c0 + r * ldc + c + 16, x[2 * r + 1]);
            }
        }
        for (; c < Nc; c += 16) {  /* 16 or 8 columns (Nc % 8 == 0) */
            const __mmask16 m = Nc - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
            __m512 x[6];
            for (r = 0; r < 6; ++r) x[r] = acc ? _mm512_maskz_loadu_ps(m, c0 + r * ldc + c) : _mm512_setzero_ps();
            for (k = 0; k < K; ++k) {
                const float *ak = a0 + k * aks;
                const __m512 b0 = _mm512_maskz_loadu_ps(m, B + k * ldb + c);
                for (r = 0; r < 6; ++r) x[r] = _mm512_fmadd_ps(_mm512_set1_ps(ak[r * ars]), b0, x[r]);
            }
            for (r = 0; r < 6; ++r) _mm512_mask_storeu_ps(c0 + r * ldc + c, m, x[r]);
        }
    }
    for (; i < M; ++i) {
        const float *a0 = A + i * ars;
        float *c0 = C + i * ldc;
        for (c = 0; c < Nc; c += 16) {
            const __mmask16 m = Nc - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
            __m512 x = acc ? _mm512_maskz_loadu_ps(m, c0 + c) : _mm512_setzero_ps();
            for (k = 0; k < K; ++k)
                x = _mm512_fmadd_ps(_mm512_set1_ps(a0[k * aks]), _mm512_maskz_loadu_ps(m, B + k * ldb + c), x);
            _mm512_mask_storeu_ps(c0 + c, m, x);
        }
    }
}
#endif

static inline void taca_gemm_f32(int M, int Nc, int K, const float *A, int64_t ars, int64_t aks,
                                 const float *B, int64_t ldb, float *C, int64_t ldc, int acc) {
    int i = 0, c, k;
#if TACA_CPU_AVX512
    if (taca_use_avx512) {
        taca_gemm_f32_512(M, Nc, K, A, ars, aks, B, ldb, C, ldc, acc);
        return;
    }
#endif
    for (; i + 6 <= M; i += 6) {
        const float *a0 = A + i * ars;
        float *c0 = C + i * ldc;
        for (c = 0; c + 16 <= Nc; c += 16) {
            __m256 x00, x01, x10, x11, x20, x21, x30, x31, x40, x41, x50, x51;
            TACA_MK_LOAD(0); TACA_MK_LOAD(1); TACA_MK_LOAD(2);
            TACA_MK_LOAD(3); TACA_MK_LOAD(4); TACA_MK_LOAD(5);
            for (k = 0; k < K; ++k) {
                const float *ak = a0 + k * aks;
                const __m256 b0 = _mm256_loadu_ps(B + k * ldb + c);
                const __m256 b1 = _mm256_loadu_ps(B + k * ldb + c + 8);
                __m256 a;
                TACA_MK_FMA(0); TACA_MK_FMA(1); TACA_MK_FMA(2);
                TACA_MK_FMA(3); TACA_MK_FMA(4); TACA_MK_FMA(5);
            }
            TACA_MK_STORE(0); TACA_MK_STORE(1); TACA_MK_STORE(2);
            TACA_MK_STORE(3); TACA_MK_STORE(4); TACA_MK_STORE(5);
        }
        if (c < Nc) {
            __m256 x0, x1, x2, x3, x4, x5;
            x0 = acc ? _mm256_loadu_ps(c0 + 0 * ldc + c) : _mm256_setzero_ps();
            x1 = acc ? _mm256_loadu_ps(c0 + 1 * ldc + c) : _mm256_setzero_ps();
            x2 = acc ? _mm256_loadu_ps(c0 + 2 * ldc + c) : _mm256_setzero_ps();
            x3 = acc ? _mm256_loadu_ps(c0 + 3 * ldc + c) : _mm256_setzero_ps();
            x4 = acc ? _mm256_loadu_ps(c0 + 4 * ldc + c) : _mm256_setzero_ps();
            x5 = acc ? _mm256_loadu_ps(c0 + 5 * ldc + c) : _mm256_setzero_ps();
            for (k = 0; k < K; ++k) {
                const float *ak = a0 + k * aks;
                const __m256 b0 = _mm256_loadu_ps(B + k * ldb + c);
                x0 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 0 * ars), b0, x0);
                x1 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 1 * ars), b0, x1);
                x2 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 2 * ars), b0, x2);
                x3 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 3 * ars), b0, x3);
                x4 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 4 * ars), b0, x4);
                x5 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 5 * ars), b0, x5);
            }
            _mm256_storeu_ps(c0 + 0 * ldc + c, x0); _mm256_storeu_ps(c0 + 1 * ldc + c, x1);
            _mm256_storeu_ps(c0 + 2 * ldc + c, x2); _mm256_storeu_ps(c0 + 3 * ldc + c, x3);
            _mm256_storeu_ps(c0 + 4 * ldc + c, x4); _mm256_storeu_ps(c0 + 5 * ldc + c, x5);
        }
    }
    for (; i < M; ++i) {
        const float *a0 = A + i * ars;
        float *c0 = C + i * ldc;
        for (c = 0; c < Nc; c += 8) {
            __m256 x = acc ? _mm256_loadu_ps(c0 + c) : _mm256_setzero_ps();
            for (k = 0; k < K; ++k)
                x = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + k * aks),
                                    _mm256_loadu_ps(B + k * ldb + c), x);
            _mm256_storeu_ps(c0 + c, x);
        }
    }
}

/*
 * Rows n0 .. n0+nr of (b, h) as a row-major operand with whole vectors up to Dp: the source
 * itself when D is a multiple of 8 (*ld = token stride), else a zero-padded copy in buf.
 */
static inline const float *taca_rows_operand(const float *src, const taca_strides *s, int64_t b,
                                             int64_t h, int64_t n0, int nr, int64_t D,
                                             float *buf, int64_t *ld) {
    const int64_t Dp = taca_pad8(D);
    int r;
    if (Dp == D) {
        *ld = s->n;
        return src + taca_off(s, b, n0, h);
    }
    for (r = 0; r < nr; ++r) {
        memcpy(buf + r * Dp, src + taca_off(s, b, n0 + r, h), (size_t)D * sizeof(float));
        memset(buf + r * Dp + D, 0, (size_t)(Dp - D) * sizeof(float));
    }
    *ld = Dp;
    return buf;
}

/* dst (T x Dp, row-major) = rows n0 .. n0+nr of (b, h), zero-padded to T rows and Dp cols. */
static inline void taca_pack_rows(float *dst, const float *src, const taca_strides *s, int64_t b,
                                  int64_t h, int64_t n0, int nr, int64_t D, int64_t Dp) {
    int r;
    for (r = 0; r < nr; ++r) {
        memcpy(dst + r * Dp, src + taca_off(s, b, n0 + r, h), (size_t)D * sizeof(float));
        if (Dp > D) memset(dst + r * Dp + D, 0, (size_t)(Dp - D) * sizeof(float));
    }
    if (nr < TACA_T) memset(dst + nr * Dp, 0, (size_t)(TACA_T - nr) * Dp * sizeof(float));
}

/* dst (D x T, row-major) = transpose of rows n0 .. n0+nr of (b, h); columns >= nr zero. */
static inline void taca_pack_cols(float *dst, const float *src, const taca_strides *s, int64_t b,
                                  int64_t h, int64_t n0, int nr, int64_t D) {
    int r;
    int64_t d;
    if (nr < TACA_T) memset(dst, 0, (size_t)(D * TACA_T) * sizeof(float));
    for (r = 0; r < nr; ++r) {
        const float *x = src + taca_off(s, b, n0 + r, h);
        for (d = 0; d < D; ++d) dst[d * TACA_T + r] = x[d];
    }
}

/* Per key tile: tmask[j] = 1 for text keys, else 0; pad[j] = 0 for keys < nk, else -inf. */
static inline void taca_key_masks(float *tmask, float *pad, int64_t k0, int nk, int64_t tb,
                                  int64_t te) {
    int j;
    for (j = 0; j < TACA_T; ++j) {
        tmask[j] = (j < nk && taca_is_text(k0 + j, tb, te)) ? 1.0f : 0.0f;
        pad[j] = j < nk ? 0.0f : -INFINITY;
    }
}

/*
 * S^T (nk keys x T queries, row-major) for keys k0 .. k0+nk of (b, h): K rows read in place
 * times a transposed query tile scaled for text keys (qt, D x T) or for visual keys (qv),
 * split at the text range [tb, te): the logit multiplier of a (query, key) pair depends on
 * the key only through "is text", so it is folded into the two scaled copies of Q^T.
 */
static inline void taca_logits_t(const float *k, const taca_strides *ks, int64_t b, int64_t h,
                                 int64_t k0, int nk, int64_t D, int64_t tb, int64_t te,
                                 const float *qt, const float *qv, float *st) {
    const int64_t e = k0 + nk;
    const int64_t cut[4] = {k0, tb < k0 ? k0 : (tb > e ? e : tb), te < k0 ? k0 : (te > e ? e : te),
                            e};
    int r;
    for (r = 0; r < 3; ++r) {
        if (cut[r + 1] <= cut[r]) continue;
        taca_gemm_f32((int)(cut[r + 1] - cut[r]), TACA_T, (int)D, k + taca_off(ks, b, cut[r], h),
                      ks->n, 1, r == 1 ? qt : qv, TACA_T, st + (cut[r] - k0) * TACA_T, TACA_T, 0);
    }
}

/*
 * Transposed query tile (rows n0 .. n0+nq of (b, h)) scaled per query for text keys (qt) and
 * visual keys (qv); ct/cv (T,) get the multipliers. Columns >= nq are zero.
 */
static inline void taca_pack_q_scaled(const float *q, const taca_strides *qs, int64_t b,
                                      int64_t h, int64_t n0, int nq, int64_t D, int64_t tb,
                                      int64_t te, double scale, double gamma, double gamma_rev,
                                      float *qt, float *qv, float *ct, float *cv) {
    int i;
    int64_t d;
    taca_pack_cols(qv, q, qs, b, h, n0, nq, D);
    for (i = 0; i < TACA_T; ++i) {
        double c1 = 0.0, c2 = 0.0;
        if (i < nq) taca_row_mults(taca_is_text(n0 + i, tb, te), scale, gamma, gamma_rev, &c1, &c2);
        ct[i] = (float)c1;
        cv[i] = (float)c2;
    }
    for (d = 0; d < D; ++d) {
        for (i = 0; i < TACA_T; ++i) {
            qt[d * TACA_T + i] = qv[d * TACA_T + i] * ct[i];
            qv[d * TACA_T + i] *= cv[i];
        }
    }
}
TACA_AVX2_END
#endif

#endif /* TACA_CPU_COMMON_H_ */
