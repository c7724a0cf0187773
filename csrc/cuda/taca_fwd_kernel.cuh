/*
 * taca_fwd_kernel.cuh: the forward kernel template, its tile configurations and the per-dtype
 * dispatch over head dims and tiling variants. Included by taca_fwd_bf16.cu and taca_fwd_f16.cu
 * (one dtype per file so the instances compile in parallel); the algorithm is described in
 * taca_fwd.cu.
 */
#ifndef TACA_FWD_KERNEL_CUH_
#define TACA_FWD_KERNEL_CUH_

#include <math.h>

#include "taca.h"
#include "taca_cuda_common.cuh"

namespace taca_fwd {

using namespace taca_cuda;


struct FwdArgs {
    const void *q, *k, *v;
    void *out;
    float *lse, *text_mass;
    int64_t qb, qn, qh, kb, kn, kh, vb, vn, vh, ob, on, oh;
    int n, d, tb, te;  // n: query tokens N_q; [tb, te): shared key text span
    int nk;            // key/value tokens N_k
    int qtb, qte;      // shared query text span
    int group;         // query heads per key/value head (H / H_kv)
    const int64_t *spans;  // NULL or device (B, 4) {k_begin, k_end, q_begin, q_end}
    MaskArgs mask;         // mask.data NULL: no mask
    const float *gamma;
    float gamma_reverse;
    float scale_log2;  // scale * log2(e)
};

/* The FP8 forward's workspace (taca_fwd_fp8_cuda, taca_fwd_sm90_fp8.cuh): byte offsets, each 1024-aligned, of
 * q8 (B, H, N_q, 128) and k8 (B, H_kv, N_k, 128) e4m3; v8 (B, H_kv, 128, nk16) e4m3 (transposed, N_k rounded
 * up to 16); the float scales of Q's and K's 128-row tiles (B, H, nqt) and (B, H_kv, nkt); V's channel amax
 * (B, H_kv, 128) float bits. */
struct Fp8Layout {
    int64_t q8, k8, v8, qs, ks, vs, total;
    int nqt, nkt, nk16;
};
static inline Fp8Layout fp8_layout(int64_t B, int64_t H, int64_t Hkv, int64_t nq, int64_t nk) {
    auto up = [](int64_t x) { return (x + 1023) / 1024 * 1024; };
    Fp8Layout L;
    L.nqt = (int)((nq + 127) / 128);
    L.nkt = (int)((nk + 127) / 128);
    L.nk16 = (int)((nk + 15) / 16 * 16);
    int64_t o = 0;
    L.q8 = o, o += up(B * H * nq * 128);
    L.k8 = o, o += up(B * Hkv * nk * 128);
    L.v8 = o, o += up(B * Hkv * 128 * L.nk16);
    L.qs = o, o += up(B * H * L.nqt * 4);
    L.ks = o, o += up(B * Hkv * L.nkt * 4);
    L.vs = o, o += up(B * Hkv * 128 * 4);
    L.total = o;
    return L;
}

template <int DP_, int MT_, int BC_, int WARPS_, int STAGES_ = 2, int MINB_ = 1>
struct FwdConfig {
    static constexpr int STAGES = STAGES_;  // 2: K/V_{j+2} load overlaps tile j+1; 1: FA2's K/V split
    static constexpr int MINB = MINB_;    // __launch_bounds__ min blocks per SM (register cap)
    static constexpr int DP = DP_;        // padded head dim
    static constexpr int MT = MT_;        // 16-row m-tiles per warp
    static constexpr int BC = BC_;        // keys per K/V tile
    static constexpr int WARPS = WARPS_;
    static constexpr int THREADS = WARPS * 32;
    static constexpr int BR = WARPS * 16 * MT;
    static constexpr int LD = DP + 8;     // smem row pitch (elements): +16 B kills ldmatrix conflicts
    static constexpr int NT = BC / 8;     // n-tiles of S
    static constexpr int KD = DP / 16;    // k-steps of Q K^T
    static constexpr int DT = DP / 8;     // n-tiles of O
    static constexpr size_t SMEM = (size_t)(BR + 2 * STAGES * BC) * LD * 2;
};

/* Rows [row0, row0 + ROWS) of one (B, N, H, D) tensor slice into smem (pitch LD), zero-padded
 * for rows >= n and columns >= d. */
template <typename T, int ROWS, int DP, int LD, int THREADS, bool ALIGNED>
__device__ __forceinline__ void load_tile(T *s, const T *g, int64_t stride_n, int row0, int n,
                                          int d, int tid) {
    constexpr int CPR = DP / 8;  // 16-byte chunks per row
    if constexpr (ALIGNED && THREADS % CPR == 0 && ROWS % (THREADS / CPR) == 0) {
        // Each thread keeps one column chunk and walks rows: one pointer, one stride register.
        constexpr int RSTEP = THREADS / CPR;
        const int c = tid % CPR, r0 = tid / CPR;
        const bool cok = c * 8 < d;
        const T *src = g + (int64_t)(row0 + r0) * stride_n + c * 8;
        const int64_t step = (int64_t)RSTEP * stride_n;
        const uint32_t dst = smem_u32(s + r0 * LD + c * 8);
#pragma unroll
        for (int it = 0; it < ROWS / RSTEP; ++it) {
            const bool ok = cok && row0 + r0 + it * RSTEP < n;
            cp_async_16(dst + it * RSTEP * LD * 2, ok ? src : g, ok ? 16 : 0);
            src += step;
        }
    } else if constexpr (ALIGNED) {
#pragma unroll
        for (int i = tid; i < ROWS * CPR; i += THREADS) {
            const int r = i / CPR, c = i % CPR;
            const int row = row0 + r;
            const bool ok = row < n && c * 8 < d;
            const T *src = ok ? g + (int64_t)row * stride_n + c * 8 : g;
            cp_async_16(smem_u32(s + r * LD + c * 8), src, ok ? 16 : 0);
        }
    } else {
        for (int i = tid; i < ROWS * DP; i += THREADS) {
            const int r = i / DP, c = i % DP;
            const int row = row0 + r;
            T val = from_float<T>(0.0f);
            if (row < n && c < d) val = g[(int64_t)row * stride_n + c];
            s[r * LD + c] = val;
        }
    }
}

/* K and V rows [row0, row0 + ROWS) into their smem buffers (V at a fixed offset from K) in one
 * pass: the row predicate and the smem offsets are shared, which saves registers. */
template <typename T, int ROWS, int DP, int LD, int THREADS, bool ALIGNED, int V_OFF>
__device__ __forceinline__ void load_kv_tile(T *sk, const T *gk, int64_t kn, const T *gv,
                                             int64_t vn, int row0, int n, int d, int tid) {
    constexpr int CPR = DP / 8;
    if constexpr (ALIGNED && THREADS % CPR == 0 && ROWS % (THREADS / CPR) == 0) {
        constexpr int RSTEP = THREADS / CPR;
        const int c = tid % CPR, r0 = tid / CPR;
        const bool cok = c * 8 < d;
        const T *srck = gk + (int64_t)(row0 + r0) * kn + c * 8;
        const T *srcv = gv + (int64_t)(row0 + r0) * vn + c * 8;
        const uint32_t dst = smem_u32(sk + r0 * LD + c * 8);
#pragma unroll
        for (int it = 0; it < ROWS / RSTEP; ++it) {
            const bool ok = cok && row0 + r0 + it * RSTEP < n;
            cp_async_16(dst + it * RSTEP * LD * 2, ok ? srck + it * RSTEP * kn : gk, ok ? 16 : 0);
            cp_async_16(dst + (V_OFF + it * RSTEP * LD) * 2, ok ? srcv + it * RSTEP * vn : gv, ok ? 16 : 0);
        }
    } else {
        load_tile<T, ROWS, DP, LD, THREADS, ALIGNED>(sk, gk, kn, row0, n, d, tid);
        load_tile<T, ROWS, DP, LD, THREADS, ALIGNED>(sk + V_OFF, gv, vn, row0, n, d, tid);
    }
}

/* Tile kinds: which key columns of a K/V tile are text. Uniform tiles (the vast majority) skip
 * the per-element select and, for visual tiles, the text-mass sum. */
enum { TILE_VIS = 0, TILE_TXT = 1, TILE_MIXED = 2 };

/* Scale S by the TACA multiplier, mask keys >= n (n = N_k), add the key mask (mixed tiles
 * only: the callers send every tile of a masked call there; row0 = this lane's first query row,
 * rows mt * 16 + hf * 8 after it, rows >= nq are padding; MASKED only; or, KEYT, a key mask's terms of the
 * tile in shared memory, key k0 + c at kt[c]),
 * update the running max / row sum /
 * text sum, leave P (unnormalized, base 2) in s and the rescale factor of O in alpha_out; with
 * SCALE_O, also rescale O here (otherwise the caller does, e.g. once an in-flight P V product
 * landed). */
template <int KIND, bool SCALE_O = true, bool MASKED = false, bool KEYT = false, bool TREE = true, int MT, int NT,
          int DT>
__device__ __forceinline__ void softmax_tile(float (&s)[MT][NT][4], float (&o)[MT][DT][4],
                                             float (&m_run)[MT][2], float (&l_run)[MT][2],
                                             float (&t_run)[MT][2], const float (&mul_txt)[MT][2],
                                             const float (&mul_vis)[MT][2], int k0, int n, int tb,
                                             int te, int lane, float (&alpha_out)[MT][2],
                                             const MaskArgs &mask, int64_t mbase, int row0, int nq,
                                             const float *kt = nullptr) {
    static_assert(!KEYT || (KIND == TILE_MIXED && !MASKED), "key terms: mixed tiles");
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            // Uniform tiles keep S raw: max(raw) * mul is the max of the scaled logits (the
            // launcher only takes this path when mul >= 0), and exp2 gets one FFMA.
            const float mul = KIND == TILE_TXT ? mul_txt[mt][hf] : mul_vis[mt][hf];
            float mx;
            if constexpr (KIND == TILE_MIXED) {
                mx = m_run[mt][hf];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float &x = s[mt][nt][hf * 2 + e];
                        const int col = k0 + nt * 8 + (lane & 3) * 2 + e;
                        const bool ct = col >= tb && col < te;
                        x = col < n ? x * (ct ? mul_txt[mt][hf] : mul_vis[mt][hf]) : -INFINITY;
                        if constexpr (KEYT)  // the tile's terms (shared memory), key col at kt[col - k0]
                            x += kt[nt * 8 + (lane & 3) * 2 + e];
                        const int row = row0 + mt * 16 + hf * 8;
                        if constexpr (MASKED) {
                            if (mask.data && col < n && row < nq) x += mask_log2(mask, mbase, row, col);
                        } else {
                            (void)row;
                        }
                        mx = fmaxf(mx, x);
                    }
            } else {
                // TREE (the Hopper kernels): the row's max as a tree (depth log2(2 NT) instead of a chain of NT
                // dependent FMNMX: the chain waited on each max's fixed latency, ~16 x 4-6 clocks per row and tile at
                // D = 128; KERNEL_LOG, twenty-eighth session). The same value in any order (max is exact), so the
                // outputs do not move. The mma.sync kernels keep the chain (with the tree ptxas gave some of their
                // instances more registers or spills).
                float mr;
                if constexpr (TREE) {
                    float v[NT];
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) v[nt] = fmaxf(s[mt][nt][hf * 2], s[mt][nt][hf * 2 + 1]);
#pragma unroll
                    for (int st = 1; st < NT; st *= 2)
#pragma unroll
                        for (int i = 0; i + st < NT; i += 2 * st) v[i] = fmaxf(v[i], v[i + st]);
                    mr = v[0];
                } else {
                    mr = s[mt][0][hf * 2];
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
                        mr = fmaxf(mr, fmaxf(s[mt][nt][hf * 2], s[mt][nt][hf * 2 + 1]));
                }
                mx = fmaxf(m_run[mt][hf], mr * mul);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mbase = mx == -INFINITY ? 0.0f : mx;
            const float alpha = fast_exp2(m_run[mt][hf] - mbase);
            m_run[mt][hf] = mx;
            float ls = 0.0f, ts = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pr = KIND == TILE_MIXED ? fast_exp2(s[mt][nt][hf * 2 + e] - mbase)
                                                        : fast_exp2(fmaf(s[mt][nt][hf * 2 + e], mul, -mbase));
                    s[mt][nt][hf * 2 + e] = pr;
                    ls += pr;
                    if constexpr (KIND == TILE_MIXED) {
                        const int col = k0 + nt * 8 + (lane & 3) * 2 + e;
                        ts += (col >= tb && col < te) ? pr : 0.0f;
                    }
                }
            l_run[mt][hf] = l_run[mt][hf] * alpha + ls;
            if constexpr (KIND == TILE_VIS) t_run[mt][hf] *= alpha;
            else if constexpr (KIND == TILE_TXT) t_run[mt][hf] = t_run[mt][hf] * alpha + ls;
            else t_run[mt][hf] = t_run[mt][hf] * alpha + ts;
            alpha_out[mt][hf] = alpha;
            if constexpr (SCALE_O) {
#pragma unroll
                for (int dt = 0; dt < DT; ++dt) {
                    o[mt][dt][hf * 2] *= alpha;
                    o[mt][dt][hf * 2 + 1] *= alpha;
                }
            }
        }
}

/* FEAT: per-sample spans and a mask (a.spans / a.mask read); without it the spans are the shared
 * fields and nothing is masked, so the common case keeps its registers (the span stays in the
 * constant bank). N_q != N_k and grouped KV heads need no template switch. */
template <typename T, typename Cfg, bool ALIGNED, bool FEAT>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MINB)
taca_fwd_kernel(const FwdArgs a) {
    constexpr int DP = Cfg::DP, MT = Cfg::MT, BC = Cfg::BC, BR = Cfg::BR, LD = Cfg::LD;
    constexpr int NT = Cfg::NT, KD = Cfg::KD, DT = Cfg::DT, THREADS = Cfg::THREADS;
    constexpr int STAGES = Cfg::STAGES;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sK = sQ + BR * LD;             // STAGES buffers of BC rows
    T *sV = sK + STAGES * BC * LD;    // STAGES buffers of BC rows

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int h = blockIdx.y, b = blockIdx.z;
    const int q0 = blockIdx.x * BR;
    const Span sp = FEAT ? span_of(a.spans, b, a.tb, a.te, a.qtb, a.qte) : Span{a.tb, a.te, a.qtb, a.qte};
    const int n = a.n, nk = a.nk, d = a.d, tb = sp.kb, te = sp.ke;
    const int nkv = (nk + BC - 1) / BC;
    const int hk = h / a.group;
    const bool masked = FEAT && a.mask.data != nullptr;
    const bool key_mask = masked && a.mask.q == 0;  // the same for every query: voted per tile
    const int64_t mbase = FEAT ? (int64_t)b * a.mask.b + (int64_t)h * a.mask.h : 0;

    const T *gq = static_cast<const T *>(a.q) + b * a.qb + h * a.qh + (int64_t)q0 * a.qn;
    const T *gk = static_cast<const T *>(a.k) + b * a.kb + hk * a.kh;
    const T *gv = static_cast<const T *>(a.v) + b * a.vb + hk * a.vh;

    load_tile<T, BR, DP, LD, THREADS, ALIGNED>(sQ, gq, a.qn, 0, n - q0, d, tid);
    load_tile<T, BC, DP, LD, THREADS, ALIGNED>(sK, gk, a.kn, 0, nk, d, tid);
    if constexpr (STAGES == 2) {
        load_tile<T, BC, DP, LD, THREADS, ALIGNED>(sV, gv, a.vn, 0, nk, d, tid);
        cp_async_commit();
        if (nkv > 1)
            load_kv_tile<T, BC, DP, LD, THREADS, ALIGNED, STAGES * BC * LD>(sK + BC * LD, gk, a.kn, gv, a.vn, BC, nk, d, tid);
    }
    cp_async_commit();

    // Per owned row: the base-2 logit multiplier for text keys and for visual keys.
    const float g = a.gamma[b];
    float mul_txt[MT][2], mul_vis[MT][2];
    const int wrow0 = warp * 16 * MT;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = q0 + wrow0 + mt * 16 + (lane >> 2) + hf * 8;
            const bool rt = row >= sp.qb && row < sp.qe;
            mul_txt[mt][hf] = a.scale_log2 * (rt ? 1.0f : g);
            mul_vis[mt][hf] = a.scale_log2 * (rt ? a.gamma_reverse : 1.0f);
        }

    float o[MT][DT][4];
    float m_run[MT][2], l_run[MT][2], t_run[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.0f;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            m_run[mt][hf] = -INFINITY;
            l_run[mt][hf] = 0.0f;
            t_run[mt][hf] = 0.0f;
        }
    }

    // Per-lane ldmatrix base addresses; every fragment is a compile-time offset from these.
    const uint32_t q_lane = smem_u32(sQ + (wrow0 + (lane & 15)) * LD + (lane >> 4) * 8);
    const uint32_t k_lane = smem_u32(sK + ((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8);
    const uint32_t v_lane = smem_u32(sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8);

    for (int j = 0; j < nkv; ++j) {
        const int k0 = j * BC;
        const int buf = STAGES == 2 ? (j & 1) : 0;
        const uint32_t buf_off = (uint32_t)(buf * BC * LD * 2);
        if constexpr (STAGES == 2) {
            cp_async_wait<1>();
            __syncthreads();  // K_j, V_j (and Q) landed
        } else {
            cp_async_wait<0>();
            __syncthreads();  // K_j (and Q) landed; every warp is done reading V_{j-1}
            load_tile<T, BC, DP, LD, THREADS, ALIGNED>(sV, gv, a.vn, k0, nk, d, tid);
            cp_async_commit();
        }

        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;

#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldmatrix_x4(qa[mt], q_lane + (uint32_t)((mt * 16 * LD + kk * 16) * 2));
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t kb[4];
                ldmatrix_x4(kb, k_lane + buf_off + (uint32_t)((np * 16 * LD + kk * 16) * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(s[mt][2 * np], qa[mt], kb);
                    mma_16816<T>(s[mt][2 * np + 1], qa[mt], kb + 2);
                }
            }
        }

        const int k1 = k0 + BC;
        const int row0 = q0 + wrow0 + (lane >> 2);
        float alpha[MT][2];
        const bool tmask = key_mask ? !keys_attend<BC>(a.mask, mbase, k0, nk, lane) : masked;
        if (!tmask && a.scale_log2 >= 0.0f && k1 <= nk && (k1 <= tb || k0 >= te))
            softmax_tile<TILE_VIS, true, false, false, false>(s, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb,
                                                              te, lane, alpha, a.mask, mbase, row0, n);
        else if (!tmask && a.scale_log2 >= 0.0f && k1 <= nk && k0 >= tb && k1 <= te)
            softmax_tile<TILE_TXT, true, false, false, false>(s, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb,
                                                              te, lane, alpha, a.mask, mbase, row0, n);
        else if (tmask)
            softmax_tile<TILE_MIXED, true, FEAT, false, false>(s, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb,
                                                               te, lane, alpha, a.mask, mbase, row0, n);
        else
            softmax_tile<TILE_MIXED, true, false, false, false>(s, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk,
                                                                tb, te, lane, alpha, a.mask, mbase, row0, n);

        uint32_t pa[MT][BC / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
                pa[mt][kk][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][kk][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][kk][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][kk][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }

        if constexpr (STAGES == 1) {
            cp_async_wait<0>();
            __syncthreads();  // V_j landed; every warp is done reading K_j
            if (j + 1 < nkv) {
                load_tile<T, BC, DP, LD, THREADS, ALIGNED>(sK, gk, a.kn, k1, nk, d, tid);
                cp_async_commit();
            }
        }

#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk)
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, v_lane + buf_off + (uint32_t)((kk * 16 * LD + dp * 16) * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(o[mt][2 * dp], pa[mt][kk], vb);
                    mma_16816<T>(o[mt][2 * dp + 1], pa[mt][kk], vb + 2);
                }
            }

        if constexpr (STAGES == 2) {
            __syncthreads();  // every warp is done reading buffer `buf`
            if (j + 2 < nkv)
                load_kv_tile<T, BC, DP, LD, THREADS, ALIGNED, STAGES * BC * LD>(
                    sK + buf * BC * LD, gk, a.kn, gv, a.vn, k0 + 2 * BC, nk, d, tid);
            cp_async_commit();  // possibly empty: keeps one group per tile for wait_group<1>
        }
    }

    // Epilogue: normalize, write lse / text_mass, stage O through this warp's own rows of sQ
    // (no other warp reads them) and store rows with 16-byte (or element-wise) writes.
    const int64_t bh_row = ((int64_t)b * gridDim.y + h) * n;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float l = l_run[mt][hf], t = t_run[mt][hf];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            t += __shfl_xor_sync(0xffffffffu, t, 1);
            t += __shfl_xor_sync(0xffffffffu, t, 2);
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            const int rloc = wrow0 + mt * 16 + (lane >> 2) + hf * 8;
            const int row = q0 + rloc;
            if ((lane & 3) == 0 && row < n) {
                if (a.lse) a.lse[bh_row + row] = (m_run[mt][hf] + log2f(l)) * 0.69314718055994531f;
                if (a.text_mass) a.text_mass[bh_row + row] = t * inv;
            }
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const uint32_t v = pack2<T>(o[mt][dt][hf * 2] * inv, o[mt][dt][hf * 2 + 1] * inv);
                *reinterpret_cast<uint32_t *>(sQ + rloc * LD + dt * 8 + (lane & 3) * 2) = v;
            }
        }
    __syncwarp();
    T *go = static_cast<T *>(a.out) + b * a.ob + h * a.oh;
    if constexpr (ALIGNED) {
        constexpr int CPR = DP / 8;
        for (int i = lane; i < 16 * MT * CPR; i += 32) {
            const int r = i / CPR, c = i % CPR;
            const int row = q0 + wrow0 + r;
            if (row < n && c * 8 < d)
                *reinterpret_cast<uint4 *>(go + (int64_t)row * a.on + c * 8) =
                    *reinterpret_cast<const uint4 *>(sQ + (wrow0 + r) * LD + c * 8);
        }
    } else {
        for (int i = lane; i < 16 * MT * DP; i += 32) {
            const int r = i / DP, c = i % DP;
            const int row = q0 + wrow0 + r;
            if (row < n && c < d) go[(int64_t)row * a.on + c] = sQ[(wrow0 + r) * LD + c];
        }
    }
}

template <typename T, typename Cfg, bool ALIGNED, bool FEAT = false>
int launch(const FwdArgs &a, int batch, int heads, cudaStream_t stream) {
    auto kernel = taca_fwd_kernel<T, Cfg, ALIGNED, FEAT>;
    const size_t smem = Cfg::SMEM;
    TACA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                  "taca_fwd_cuda: cudaFuncSetAttribute");
    dim3 grid((a.n + Cfg::BR - 1) / Cfg::BR, heads, batch);
    kernel<<<grid, Cfg::THREADS, smem, stream>>>(a);
    return taca_cuda_check_launch("taca_fwd_cuda: kernel launch");
}

/* variant 0 is the tuned default; 1..5 are alternative tilings of the aligned D = 64 / 128
 * paths, kept selectable (taca_fwd_cuda_variant) so the benchmark can compare them:
 * 1: one K/V stage (FA2's split K/V overlap), 2: 128-key tiles, 3: 64-row CTAs,
 * 4: 8 warps x 16 rows with a 128-register cap, 5: 32-key tiles. With FEAT (per-sample spans
 * or a mask) only the default tiling is instantiated. */
template <typename T, bool ALIGNED, int D, bool FEAT>
int dispatch_tuned(const FwdArgs &a, int variant, int batch, int heads, cudaStream_t stream) {
    if constexpr (ALIGNED && !FEAT) {
        switch (variant) {
        case 1: return launch<T, FwdConfig<D, 2, 64, 4, 1>, ALIGNED>(a, batch, heads, stream);
        case 2: return launch<T, FwdConfig<D, 2, 128, 4, 2>, ALIGNED>(a, batch, heads, stream);
        case 3: return launch<T, FwdConfig<D, 1, 64, 4, 2>, ALIGNED>(a, batch, heads, stream);
        case 4: return launch<T, FwdConfig<D, 1, 64, 8, 2, 2>, ALIGNED>(a, batch, heads, stream);
        case 5: return launch<T, FwdConfig<D, 2, 32, 4, 2>, ALIGNED>(a, batch, heads, stream);
        default: break;
        }
    }
    return launch<T, FwdConfig<D, 2, 64, 4, 2>, ALIGNED, FEAT>(a, batch, heads, stream);
}

template <typename T, bool ALIGNED, bool FEAT>
int dispatch_dim_feat(const FwdArgs &a, int variant, int batch, int heads, cudaStream_t stream) {
    if (a.d <= 32) return launch<T, FwdConfig<32, 2, 64, 4, 2>, ALIGNED, FEAT>(a, batch, heads, stream);
    if (a.d <= 64) return dispatch_tuned<T, ALIGNED, 64, FEAT>(a, variant, batch, heads, stream);
    if (a.d <= 96) return launch<T, FwdConfig<96, 2, 64, 4, 2>, ALIGNED, FEAT>(a, batch, heads, stream);
    if (a.d <= 128) return dispatch_tuned<T, ALIGNED, 128, FEAT>(a, variant, batch, heads, stream);
    if (a.d <= 160) return launch<T, FwdConfig<160, 1, 64, 4, 2>, ALIGNED, FEAT>(a, batch, heads, stream);
    if (a.d <= 192) return launch<T, FwdConfig<192, 1, 64, 4, 2>, ALIGNED, FEAT>(a, batch, heads, stream);
    return launch<T, FwdConfig<256, 1, 64, 4, 2>, ALIGNED, FEAT>(a, batch, heads, stream);
}

/* FEAT (per-sample spans or a mask) picks the kernel instance that reads a.spans / a.mask. */
template <typename T, bool ALIGNED>
int dispatch_dim(const FwdArgs &a, int variant, int batch, int heads, cudaStream_t stream) {
    if (a.spans || a.mask.data) return dispatch_dim_feat<T, ALIGNED, true>(a, variant, batch, heads, stream);
    return dispatch_dim_feat<T, ALIGNED, false>(a, variant, batch, heads, stream);
}

/* Defined in taca_fwd_bf16.cu / taca_fwd_f16.cu. */
int dispatch_bf16(const FwdArgs &a, int variant, bool aligned, int batch, int heads,
                  cudaStream_t stream);
int dispatch_f16(const FwdArgs &a, int variant, bool aligned, int batch, int heads,
                 cudaStream_t stream);

}  // namespace taca_fwd

#endif  /* TACA_FWD_KERNEL_CUH_ */
