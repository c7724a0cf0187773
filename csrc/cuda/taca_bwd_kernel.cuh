/*
 * taca_bwd_kernel.cuh: the tiled backward kernels of gamma-scaled joint attention
 * (templates; instantiated in taca_bwd_d64.cu, taca_bwd_d128.cu, taca_bwd_d256.cu and
 * launched by taca_bwd.cu, whose header explains the algorithm and the choices).
 *
 * Forward, the line being differentiated (DESIGN.md section 1; taca.h):
 *   s_ij = scale * (q_i . k_j) * m_ij + mask_ij,  P_ij = exp(s_ij - lse_i),  out_i = sum_j P_ij v_j
 * Backward, per (query tile i, key tile j):
 *   dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - delta_i),
 *   dV_j += P_ij dO_i,  dK_j += scale m_ij dS_ij q_i,  dQ_i += scale m_ij dS_ij k_j.
 * (mask_ij is a constant: it changes P only.) Query head h reads key/value head h / group; a
 * CTA owns one key/value head and walks the query tiles of all group query heads of it.
 */
#ifndef TACA_BWD_KERNEL_CUH_
#define TACA_BWD_KERNEL_CUH_

#include <stdlib.h>
#include <string.h>

#include "taca_cuda_common.cuh"

namespace taca_bwd {

using namespace taca_cuda;

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockN = 16 * kWarps;  // key rows per CTA: 16 per warp

/* Everything the device needs, passed by value. Element strides, D stride 1. */
struct BwdArgs {
    const void *q, *out, *dout;          // (B, N, H, D): N = N_q queries, H query heads
    const void *k, *v;                   // (B, Nk, Hkv, D)
    void *dq;                            // (B, N, H, D)
    void *dk, *dv;                       // (B, Nk, Hkv, D)
    const float *lse;                    // (B, H, N) contiguous (-inf: fully masked row)
    const float *gamma;                  // (B,) device
    float *lse2;                         // workspace (B, H, Np): lse * log2(e); +inf past N and
                                         // where lse = -inf (fully masked rows: P = 0)
    float *delta;                        // workspace (B, H, Np): dO . O, 0 past N
    int *sem;                            // workspace (nseg, B, nchunk, H, nq): dQ add order
    float *dq_acc;                       // workspace (nseg, B, H, Np, acc_ld) fp32 partial dQ sums
    int64_t qs_b, qs_n, qs_h, ks_b, ks_n, ks_h, vs_b, vs_n, vs_h, os_b, os_n, os_h;
    int64_t dos_b, dos_n, dos_h, dqs_b, dqs_n, dqs_h, dks_b, dks_n, dks_h, dvs_b, dvs_n, dvs_h;
    int B, N, H, D, Np, nq;  // N = N_q; Np = N rounded up to the query tile, nq = Np / BM
    int Nk, Hkv, group;      // N_k keys, Hkv key/value heads, group = H / Hkv query heads each
    int nk;                  // key tiles: ceil(Nk / kBlockN)
    int nseg, seg_size;  // key tiles form nseg chains of seg_size (the last may be shorter)
    int text_begin, text_end;      // shared key text span [begin, end)
    int q_text_begin, q_text_end;  // shared query text span
    const int64_t *spans;  // NULL or device (B, 4) {k_begin, k_end, q_begin, q_end}: overrides
    MaskArgs mask;         // mask.data NULL: no mask (then mask_ij = 0)
    float gamma_reverse, scale;
    int vec_load;   // q, k, v, dout: 16-byte aligned rows (D % 8 == 0, strides % 8 == 0)
    int pair_store; // dq, dk, dv: 4-byte aligned pairs (D even, strides even)
    int mode;       // dQ accumulation, see DqMode
    // v6 only: the main kernel counts each finished dQ tile in sem (ordered: every chain's last
    // link releases it too; unordered: every key tile's CTA adds 1) and bwd_dq_convert_tiles,
    // launched as its programmatic dependent, converts tiles as they complete; work is that
    // kernel's item counter (workspace, zeroed with sem)
    int dq_overlap;
    unsigned long long *work;
    // dq_acc's row stride in floats (>= DP; the conversions read it): DP, or DP + 8 for v6's row
    // writer, which adds a staged tile, 32 bytes of padding per row included, as one block
    int acc_ld;
    // a key mask (mask.q == 0): the backward kernels read each thread's two key terms once per query
    // tile (key_mask_terms), not per element; TACA_BWD_MASK=elem forces the per-element path (timing)
    int mask_keys;
    // v6 and bwd_main: the length of the chains they run with the skew (taca_bwd.cu layout_of: two chains at
    // most; <= seg_size's chains in number, so they fit the workspace), the same in every mode; skew != 0
    // (apply_skew_rule): the CTA of key tile jt walks the flattened query tiles from (-jt) mod (group * nq)
    // on, cyclically, so each chain link reaches a tile one step after its predecessor (taca_bwd_sm90_v6.cu,
    // item 10)
    int chain_len;
    int skew;
};

/* Padding of the workspace's dQ rows, in floats: the buffers hold DP + kAccPad floats per row, so
 * v6's row writer can add a staged tile (rows padded by this much against bank conflicts) as one
 * block (BwdArgs::acc_ld; the other kernels use DP of each row). */
constexpr int kAccPad = 8;

/* How key tiles combine their dQ parts. kOrdered is the default (deterministic); kAtomic is
 * FlashAttention-2's float atomicAdd (non-deterministic, params->deterministic == 0). kRacy and
 * kSkip give wrong dq and exist only to time the cost of the ordering (TACA_BWD_MODE). */
enum DqMode { kOrdered = 0, kAtomic = 1, kRacy = 2, kSkip = 3 };

/* The skew rule (taca_bwd_sm90_v6.cu, item 10; bwd_main takes it too): a->skew = 1 where it applies, and then in
 * the ordered mode the chains it runs (a->chain_len key tiles each, two chains at most: taca_bwd.cu layout_of,
 * never more buffers than the workspace holds). It applies where a chain fits the flattened query tiles (distinct
 * steps) and half the SMs: a link may wait on a later one of its chain, and with at most half the SMs in one chain
 * the CTAs of the chain at the dispatch front cannot hold every SM (other kernels beside it, NCCL's in DDP, take
 * fewer). Under MPS with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE the SMs counted are that share; on a GPU partitioned
 * otherwise (green contexts) TACA_BWD_SKEW=0 turns it off (also a timing and test switch; read per call). Decided
 * on chain_len in every mode, so dK / dV sum the query tiles alike in all. sms: the device's SM count (<= 0:
 * unknown, no skew). */
inline void apply_skew_rule(BwdArgs *a, int sms) {
    const char *sk = getenv("TACA_BWD_SKEW");
    if (const char *mps = getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")) {
        const double pct = atof(mps);
        if (pct > 0. && pct < 100.) sms = static_cast<int>(sms * pct / 100.);
    }
    a->skew = !(sk && !strcmp(sk, "0")) && a->nk > 1 && a->chain_len <= a->group * a->nq && 2 * a->chain_len <= sms;
    if (a->skew && a->mode == kOrdered) {
        a->seg_size = a->chain_len;
        a->nseg = (a->nk + a->chain_len - 1) / a->chain_len;
    }
}

/* The skewed walk: the flattened query tile a CTA whose tile offset is soff (= (nqt - jt % nqt) % nqt with the skew,
 * else 0) takes at step it, and a chain link's rank in tile x's chain order (p: its chain position, len: its chain's
 * length, chain0: the chain's first key tile): the order of the links' visits to x (see taca_bwd_sm90_v6.cu, 10). */
__device__ __forceinline__ int skew_tile(int it, int soff, int nqt) {
    return it + soff < nqt ? it + soff : it + soff - nqt;
}
__device__ __forceinline__ int skew_rank(int x, int p, int len, int chain0, int nqt, bool skew) {
    if (!skew) return p;
    int y = x + chain0 % nqt;
    if (y >= nqt) y -= nqt;
    const int head = y > nqt - len ? nqt - y : 0;
    return p >= head ? p - head : p - head + len;
}

__device__ __forceinline__ int ld_acquire(const int *p) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* *p = v with release semantics at gpu scope (a chain link hands a dQ tile to its successor, which
 * polls with ld_acquire): lighter than __threadfence() (fence.sc) + atomicExch. */
__device__ __forceinline__ void st_release(int *p, int v) {
    asm volatile("st.release.gpu.global.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

/* *p += v with release semantics at gpu scope (unordered mode: a CTA counts a dQ tile it added). */
__device__ __forceinline__ void red_release_add(int *p, int v) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

/* p[0] += a, p[1] += b as one fire-and-forget reduction (sm_90: one vector op). */
__device__ __forceinline__ void red_add2(float *p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b)
                 : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

/* Copy a (R, DP) tile of a (.., N, .., D) tensor (rows from row pointer base, row stride sn)
 * into shared memory with row stride LD, zero-filling rows >= rows_valid and columns >= D. */
template <typename T, int R, int DP, int LD>
__device__ __forceinline__ void load_tile(T *s, const T *base, int64_t sn, int rows_valid, int D,
                                          bool vec, int tid) {
    if (vec) {
        constexpr int CH = DP / 8;
#pragma unroll 4
        for (int idx = tid; idx < R * CH; idx += kThreads) {
            const int r = idx / CH, c = idx % CH;
            const bool ok = r < rows_valid && c * 8 < D;
            const T *src = ok ? base + r * sn + c * 8 : base;
            cp_async_16(smem_u32(s + r * LD + c * 8), src, ok ? 16 : 0);
        }
    } else {
        for (int idx = tid; idx < R * DP; idx += kThreads) {
            const int r = idx / DP, c = idx % DP;
            s[r * LD + c] = (r < rows_valid && c < D) ? base[r * sn + c] : from_float<T>(0.f);
        }
    }
}

template <typename T>
__device__ __forceinline__ void store_pair(T *row, int col, int D, bool pair, float v0, float v1) {
    if (pair && col + 1 < D) {
        *reinterpret_cast<uint32_t *>(row + col) = pack2<T>(v0, v1);
    } else {
        if (col < D) row[col] = from_float<T>(v0);
        if (col + 1 < D) row[col + 1] = from_float<T>(v1);
    }
}

/* The epilogue of every backward main kernel: dK = scale * dK' and dV (summed over the group) of
 * key/value head hk, batch b, for this thread's key rows kr0, kr1 (< Nk) and NB 8-column blocks from
 * column c0 (+ 2t, + 1 within each): dk[nb * 4 + 2 * half + e] holds row (half ? kr1 : kr0),
 * column c0 + 8 nb + 2t + e (the mma.sync / wgmma accumulator layout). */
template <typename T, int NB>
__device__ __forceinline__ void store_dk_dv(const BwdArgs &a, int b, int hk, int Nk, int D, int kr0, int kr1, int c0,
                                            int t, const float *dk, const float *dv) {
    T *dkb = static_cast<T *>(a.dk) + b * a.dks_b + hk * a.dks_h;
    T *dvb = static_cast<T *>(a.dv) + b * a.dvs_b + hk * a.dvs_h;
    const bool pair = a.pair_store != 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = half ? kr1 : kr0;
        if (r >= Nk) continue;
        T *dkrow = dkb + static_cast<int64_t>(r) * a.dks_n;
        T *dvrow = dvb + static_cast<int64_t>(r) * a.dvs_n;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            const int col = c0 + nb * 8 + 2 * t;
            store_pair<T>(dkrow, col, D, pair, dk[nb * 4 + 2 * half] * a.scale, dk[nb * 4 + 2 * half + 1] * a.scale);
            store_pair<T>(dvrow, col, D, pair, dv[nb * 4 + 2 * half], dv[nb * 4 + 2 * half + 1]);
        }
    }
}

/* 16-byte vector access to rows of a (B, N, H, D) tensor: D % 8 == 0, base and strides aligned. */
__device__ __forceinline__ bool rows_vec16(const void *base, int64_t sb, int64_t sn, int64_t sh, int D) {
    return D % 8 == 0 && (reinterpret_cast<uintptr_t>(base) & 15) == 0 && sb % 8 == 0 && sn % 8 == 0 &&
           sh % 8 == 0;
}

/* delta = rowsum(dO * O) and lse2 = lse * log2(e) for every padded row: DP / 8 threads per row,
 * 8 columns each (one 16-byte load of O and of dO where rows_vec16 allows), summed by shuffles.
 * lse2 = +inf past N and for fully masked rows (lse = -inf), so that P = exp2(x - lse2) = 0
 * there even where x = -inf (a masked entry): no NaN, zero gradient contributions.
 * (One warp per row with 2-byte loads before: 30 us at FLUX 1024 and 60 us at SD3.5-M cfg on an
 * H200, against cuDNN's 28; benchmarks/bwd_breakdown.py.) */
template <typename T, int DP>
__global__ void __launch_bounds__(256) bwd_preprocess(const BwdArgs a) {
    constexpr int TPR = DP / 8, RPB = 256 / TPR;  // threads per row (a power of two <= 32), rows per block
    const int sub = threadIdx.x % TPR;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR;
    const int64_t rows = static_cast<int64_t>(a.B) * a.H * a.Np;
    const bool live = row < rows;  // every lane stays for the shuffles
    const int64_t bh = live ? row / a.Np : 0;
    const int n = live ? static_cast<int>(row - bh * a.Np) : a.N;
    float acc = 0.f;
    if (n < a.N) {
        const int b = static_cast<int>(bh / a.H), h = static_cast<int>(bh % a.H);
        const T *o = static_cast<const T *>(a.out) + b * a.os_b + n * a.os_n + h * a.os_h;
        const T *d = static_cast<const T *>(a.dout) + b * a.dos_b + n * a.dos_n + h * a.dos_h;
        const bool vec = rows_vec16(a.out, a.os_b, a.os_n, a.os_h, a.D) &&
                         rows_vec16(a.dout, a.dos_b, a.dos_n, a.dos_h, a.D);
        for (int c0 = sub * 8; c0 < a.D; c0 += TPR * 8) {
            if (vec) {
                const uint4 ov = *reinterpret_cast<const uint4 *>(o + c0);
                const uint4 dv = *reinterpret_cast<const uint4 *>(d + c0);
                const T *oe = reinterpret_cast<const T *>(&ov), *de = reinterpret_cast<const T *>(&dv);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc += to_float<T>(oe[e]) * to_float<T>(de[e]);
            } else {
                for (int c = c0; c < c0 + 8 && c < a.D; ++c) acc += to_float<T>(o[c]) * to_float<T>(d[c]);
            }
        }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (live && sub == 0) {
        a.delta[row] = acc;
        const float l = n < a.N ? a.lse[bh * a.N + n] : -INFINITY;
        a.lse2[row] = l == -INFINITY ? INFINITY : l * kLog2e;
    }
}

/* dq = scale * (sum of the chains' float32 sums, in chain order), cast, strided: DP / 8 threads
 * per row, 8 columns each (two 16-byte loads per chain, one 16-byte store where rows_vec16
 * allows). (One element per thread with 64-bit index divisions before: 111 us at FLUX 1024 with
 * four chains, 100 us with one, against cuDNN's 26; benchmarks/bwd_breakdown.py.) */
template <typename T, int DP>
__device__ __forceinline__ void dq_convert_row(const BwdArgs &a, int64_t bh, int n, int sub) {
    constexpr int TPR = DP / 8;
    const int b = static_cast<int>(bh / a.H), h = static_cast<int>(bh % a.H);
    T *dq = static_cast<T *>(a.dq) + b * a.dqs_b + n * a.dqs_n + h * a.dqs_h;
    const int64_t seg_stride = static_cast<int64_t>(a.B) * a.H * a.Np * a.acc_ld;
    const float *src = a.dq_acc + (bh * a.Np + n) * a.acc_ld;
    const bool vec = rows_vec16(a.dq, a.dqs_b, a.dqs_n, a.dqs_h, a.D);
    for (int c0 = sub * 8; c0 < a.D; c0 += TPR * 8) {  // one pass when D <= DP
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int sg = 0; sg < a.nseg; ++sg) {  // fixed order
            const float4 *s4 = reinterpret_cast<const float4 *>(src + sg * seg_stride + c0);
            const float4 x = __ldcs(s4), y = __ldcs(s4 + 1);
            v[0] += x.x, v[1] += x.y, v[2] += x.z, v[3] += x.w;
            v[4] += y.x, v[5] += y.y, v[6] += y.z, v[7] += y.w;
        }
        if (vec) {
            uint4 o;
            o.x = pack2<T>(v[0] * a.scale, v[1] * a.scale);
            o.y = pack2<T>(v[2] * a.scale, v[3] * a.scale);
            o.z = pack2<T>(v[4] * a.scale, v[5] * a.scale);
            o.w = pack2<T>(v[6] * a.scale, v[7] * a.scale);
            *reinterpret_cast<uint4 *>(dq + c0) = o;
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (c0 + e < a.D) dq[c0 + e] = from_float<T>(v[e] * a.scale);
        }
    }
}

template <typename T, int DP>
__global__ void __launch_bounds__(256) bwd_dq_convert(const BwdArgs a) {
    constexpr int TPR = DP / 8, RPB = 256 / TPR;
    const int64_t r = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR;  // (bh, n) over B*H*N
    if (r >= static_cast<int64_t>(a.B) * a.H * a.N) return;
    const int64_t bh = r / a.N;
    dq_convert_row<T, DP>(a, bh, static_cast<int>(r - bh * a.N), threadIdx.x % TPR);
}

/* The same conversion, one query tile (BM rows of one head) at a time, run beside the v6 main
 * kernel as its programmatic dependent launch: the grid may start once every main CTA started
 * (griddepcontrol.launch_dependents), i.e. during the main kernel's last wave, on the SMs that
 * wave leaves idle (a main CTA holds a whole SM's registers, so none of these CTAs sits beside
 * one). CTAs take items (b * H + h, query tile) in order from a.work; thread 0 waits until the
 * tile is complete: sem (nseg, B, H, nq) holds, per chain, the last link that released the tile
 * (ordered: complete at the chain's length) or, unordered (nseg = 1), how many key tiles added
 * to it (complete at nk; in trace builds TACA_BWD_MODE=atomicseg keeps the chains' buffers, each
 * complete at its chain's length). ld.acquire there, then the CTA barrier, orders the reads after
 * the writers' releases (which follow their bulk writes' completion). griddepcontrol.wait at the
 * end: the grid completes only after the main kernel did, so the stream's next kernel sees dk and
 * dv too. Same sums in the same order as bwd_dq_convert: bitwise the same dq. */
template <typename T, int DP, int BM>
__global__ void __launch_bounds__(256) bwd_dq_convert_tiles(const BwdArgs a) {
    constexpr int TPR = DP / 8, RPB = 256 / TPR;
    static_assert(BM % RPB == 0, "rows per block");
    __shared__ unsigned long long s_item[2];
    const unsigned long long items = static_cast<unsigned long long>(a.B) * a.H * a.nq;
    const int sub = threadIdx.x % TPR, rr = threadIdx.x / TPR;
    for (int round = 0;; round ^= 1) {
        if (threadIdx.x == 0) {
            const unsigned long long item = atomicAdd(a.work, 1ull);
            if (item < items) {
                const int64_t seg_items = static_cast<int64_t>(a.B) * a.H * a.nq;
                for (int sg = 0; sg < a.nseg; ++sg) {
#if defined(TACA_BWD_TRACE)
                    // the chain's length (ordered: its last link's release; unordered: that many
                    // adds; one buffer has seg_size = nk)
                    const int need = min(a.seg_size, a.nk - sg * a.seg_size);
#else
                    const int need = a.mode == kOrdered ? min(a.seg_size, a.nk - sg * a.seg_size) : a.nk;
#endif
                    const int *c = a.sem + sg * seg_items + static_cast<int64_t>(item);
                    while (ld_acquire(c) < need) __nanosleep(128);
                }
            }
            s_item[round] = item;  // two slots: no barrier needed before the next item's write
        }
        __syncthreads();
        const unsigned long long item = s_item[round];
        if (item >= items) break;
        const int64_t bh = static_cast<int64_t>(item / a.nq);
        const int n0 = static_cast<int>(item - static_cast<unsigned long long>(bh) * a.nq) * BM;
#pragma unroll
        for (int k = 0; k < BM / RPB; ++k) {
            const int n = n0 + rr + k * RPB;
            if (n < a.N) dq_convert_row<T, DP>(a, bh, n, sub);
        }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/* The two helper kernels of every backward, launched for padded head dim DP (the workspace's
 * dQ row; 256-thread blocks of 256 / (DP / 8) rows). Return TACA_OK or the launch error. */
template <int DP>
unsigned row_blocks(int64_t rows) {
    constexpr int RPB = 256 / (DP / 8);
    return static_cast<unsigned>((rows + RPB - 1) / RPB);
}
template <typename T, int DP>
int launch_preprocess(const BwdArgs &a, cudaStream_t stream, const char *what) {
    bwd_preprocess<T, DP><<<row_blocks<DP>(static_cast<int64_t>(a.B) * a.H * a.Np), 256, 0, stream>>>(a);
    return taca_cuda_check_launch(what);
}
template <typename T, int DP>
int launch_dq_convert(const BwdArgs &a, cudaStream_t stream, const char *what) {
    bwd_dq_convert<T, DP><<<row_blocks<DP>(static_cast<int64_t>(a.B) * a.H * a.N), 256, 0, stream>>>(a);
    return taca_cuda_check_launch(what);
}

/* The dQ conversion after a main kernel that counts its finished dQ tiles in sem (the Hopper kernels: v6, the D = 256
 * one): with dq_overlap == 1 as that kernel's programmatic dependent (bwd_dq_convert_tiles over BM-row tiles, on the
 * SMs its last wave leaves idle, at most 8 CTAs per SM: they take items from a counter, so however many are resident
 * do all the work), else (or where the SM count is unknown) after it. what / what_tiles: the error messages. */
template <typename T, int DP, int BM>
int launch_dq_convert_after(const BwdArgs &a, cudaStream_t stream, const char *what, const char *what_tiles) {
    if (a.dq_overlap != 1) return launch_dq_convert<T, DP>(a, stream, what);
    int sms = 0;
    if (device_sm_count(&sms, what) != TACA_OK) return launch_dq_convert<T, DP>(a, stream, what);  // convert after it
    const int64_t items = static_cast<int64_t>(a.B) * a.H * a.nq;
    int per_sm = 8;
    if (const char *e = getenv("TACA_BWD_CONV_CTAS")) {  // timing experiments only (1..8 CTAs per SM)
        const int n = atoi(e);
        if (n >= 1 && n <= 8) per_sm = n;
    }
    const int64_t conv_ctas = static_cast<int64_t>(per_sm) * sms;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(items < conv_ctas ? items : conv_ctas));
    cfg.blockDim = dim3(256);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    TACA_CUDA_TRY(cudaLaunchKernelEx(&cfg, bwd_dq_convert_tiles<T, DP, BM>, a), what_tiles);
    return taca_cuda_check_launch(what_tiles);
}

template <int DP, int BM> struct Smem {
    static constexpr int LDK = DP + 8;  // +16 bytes per row: conflict-free ldmatrix
    static constexpr int LDS = BM + 8;
    static constexpr size_t bytes_elems =
        (2 * kBlockN * LDK + 4 * BM * LDK + kBlockN * LDS) * 2;
    static constexpr size_t bytes = bytes_elems + 4 * BM * sizeof(float);
};

/*
 * One CTA per (key tile of 128 rows, key/value head x D-chunk, batch). It walks the query
 * tiles of the group's query heads h0 .. h0 + group - 1 as one flattened sequence
 * it = (h - h0) * nq + query tile (lse2, delta, sem and dq_acc are laid out so that this index
 * addresses them from the first head on), so dK, dV of the key/value head are summed over
 * the group in registers (exact, fixed order) and each query head keeps its own dQ chain.
 * 8 warps; warp w owns key rows
 * [16w, 16w + 16) for S^T = K Q^T, dP^T = V dO^T, dV += P^T dO and dK += dS^T Q, so P^T and
 * dS^T stay in registers as A fragments. dS^T also goes to shared memory for
 * dQ = dS K, computed with warps tiled (BM/16) x (8 / (BM/16)) over the (BM, DC) output and
 * added to a float32 workspace in key-tile order (see taca_bwd.cu).
 * DP: head dim padded (64, 128, 256); DC: the D-chunk of dK, dV, dQ this CTA owns.
 * MASK: a.mask.data != NULL (a separate instance, so that the unmasked kernel carries no
 * mask code and keeps its registers).
 */
template <typename T, int DP, int DC, int BM, bool MASK>
__global__ void __launch_bounds__(kThreads, 1) bwd_main(const BwdArgs a) {
    constexpr int BN = kBlockN;
    constexpr int NCH = DP / DC;
    constexpr int LDK = Smem<DP, BM>::LDK;
    constexpr int LDS = Smem<DP, BM>::LDS;
    constexpr int WM = BM / 16;
    constexpr int WN = kWarps / WM;
    constexpr int DQN = DC / WN;  // dQ columns per warp
    static_assert(DP % DC == 0 && DC % 16 == 0 && BM % 16 == 0, "tile shapes");
    static_assert(WM * WN == kWarps && DQN % 16 == 0, "dQ warp layout");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sK = reinterpret_cast<T *>(smem_raw);
    T *sV = sK + BN * LDK;
    T *sQ = sV + BN * LDK;        // [2][BM][LDK]
    T *sdO = sQ + 2 * BM * LDK;   // [2][BM][LDK]
    T *sdS = sdO + 2 * BM * LDK;  // [BN][LDS]: dS^T, key rows, query columns
    float *sL = reinterpret_cast<float *>(sdS + BN * LDS);  // [2][BM] lse2
    float *sDl = sL + 2 * BM;                               // [2][BM] delta

    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, t = lane & 3;
    const int jt = blockIdx.x;
    const int ch = blockIdx.y % NCH, hk = blockIdx.y / NCH, b = blockIdx.z;
    const int h0 = hk * a.group;  // first query head of key/value head hk
    const int j0 = jt * BN, c0 = ch * DC;
    const int N = a.N, Nk = a.Nk, D = a.D;
    const bool vec = a.vec_load != 0;
    // A key mask (the same for every query; per head only with one query head per CTA) whose
    // keys of this tile all attend: the CTA runs the unmasked paths (one warp vote, no barrier).
    const bool masked = MASK && !(a.mask.q == 0 && (a.mask.h == 0 || a.group == 1) &&
                                  keys_attend<BN>(a.mask, b * a.mask.b + h0 * a.mask.h, j0, Nk, lane));

    const T *kb = static_cast<const T *>(a.k) + b * a.ks_b + hk * a.ks_h;
    const T *vb = static_cast<const T *>(a.v) + b * a.vs_b + hk * a.vs_h;
    const int64_t bh = static_cast<int64_t>(b) * a.H + h0;  // (b, h0): the group's first row
    const float *lse2b = a.lse2 + bh * a.Np;  // flattened tile it starts at it * BM
    const float *deltab = a.delta + bh * a.Np;

    const float gam = a.gamma[b];
    const float grev = a.gamma_reverse;
    const float lg = a.scale * kLog2e;

    // Keys past Nk are zero rows of K and V (so S^T = 0 and dQ += dS^T . 0 there; the mask
    // path also gives them P = 0) and are never stored.
    load_tile<T, BN, DP, LDK>(sK, kb + j0 * a.ks_n, a.ks_n, Nk - j0, D, vec, tid);
    load_tile<T, BN, DP, LDK>(sV, vb + j0 * a.vs_n, a.vs_n, Nk - j0, D, vec, tid);

    const int nq = a.nq, nk = a.nk;
    const int nqt = a.group * nq;  // flattened query tiles: it = (h - h0) * nq + tile

    // the skew (apply_skew_rule): at step it this CTA takes flattened query tile skew_tile(it, soff, nqt)
    const int soff = a.skew ? (nqt - jt % nqt) % nqt : 0;
    auto load_q_tile = [&](int step, int buf) {
        const int it = skew_tile(step, soff, nqt);
        const int hh = it / nq;
        const int i0 = (it - hh * nq) * BM;
        const T *qp = static_cast<const T *>(a.q) + b * a.qs_b + (h0 + hh) * a.qs_h;
        const T *dop = static_cast<const T *>(a.dout) + b * a.dos_b + (h0 + hh) * a.dos_h;
        load_tile<T, BM, DP, LDK>(sQ + buf * BM * LDK, qp + i0 * a.qs_n, a.qs_n, N - i0, D, vec,
                                  tid);
        load_tile<T, BM, DP, LDK>(sdO + buf * BM * LDK, dop + i0 * a.dos_n, a.dos_n, N - i0, D,
                                  vec, tid);
        if (tid < BM / 4) {
            cp_async_16(smem_u32(sL + buf * BM + tid * 4), lse2b + it * BM + tid * 4, 16);
        } else if (tid < BM / 2) {
            const int u = tid - BM / 4;
            cp_async_16(smem_u32(sDl + buf * BM + u * 4), deltab + it * BM + u * 4, 16);
        }
    };

    load_q_tile(0, 0);
    cp_async_commit();

    // Key rows of this thread in S^T: r0 = 16w + g and r0 + 8.
    const int kr0 = j0 + 16 * w + g, kr1 = kr0 + 8;
    const int jend = j0 + BN;
    // Text spans of sample b (uniform per CTA) {keys [begin, end), queries [begin, end)} in
    // shared memory, read (and the key tests redone) at every tile after the barrier at its
    // top: values held in registers across the loop cost spills (per-sample spans are loads).
    __shared__ int s_span[4];
    if (tid == 0) {
        const Span sp =
            span_of(a.spans, b, a.text_begin, a.text_end, a.q_text_begin, a.q_text_end);
        s_span[0] = sp.kb;
        s_span[1] = sp.ke;
        s_span[2] = sp.qb;
        s_span[3] = sp.qe;
    }

    float acc_dv[DC / 8][4], acc_dk[DC / 8][4];
#pragma unroll
    for (int i = 0; i < DC / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dv[i][e] = acc_dk[i][e] = 0.f;

    const int wm = w % WM, wn = w / WM;
    // Key tile jt is number seg_pos in chain seg; each chain sums into its own dQ buffer.
    const int seg = jt / a.seg_size, seg_pos = jt % a.seg_size;
    const int seg_len = min(a.seg_size, nk - seg * a.seg_size);
    const bool ordered = a.mode == kOrdered && nk > 1;
    const int chain0 = seg * a.seg_size;  // the chain's first key tile (the skew's rank rule)
    // Counters (seg, b, ch, h, tile) and buffers (seg, b, h, Np rows): the group's heads are
    // consecutive, so flattened tile it is entry it from head h0 on.
    int *sem_row =
        a.sem + ((static_cast<int64_t>(seg * a.B + b) * NCH + ch) * a.H + h0) * nq;
    float *acc_base = a.dq_acc + (seg * static_cast<int64_t>(a.B) * a.H + bh) * a.Np * DP;

    int prev_x = 0, prev_rank = 0;  // the previous step's tile and this link's rank in its chain order
    for (int step = 0; step < nqt; ++step) {
        const int buf = step & 1;
        const int it = skew_tile(step, soff, nqt);  // the flattened query tile of this step
        const int rank = skew_rank(it, seg_pos, seg_len, chain0, nqt, a.skew != 0);
        const int hh = it / nq;                // query head h0 + hh
        const int i0 = (it - hh * nq) * BM;    // its query tile's first row
        if (step + 1 < nqt) {
            load_q_tile(step + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (ordered && tid == 0 && step > 0 && prev_rank < seg_len - 1) {
            // Release the previous query tile's dQ part (its reductions were issued before the
            // barrier above): fence.acq_rel + relaxed store, a release cumulative over the CTA.
            // Done here, not right after the reductions, so that only warp 0 waits on the fence
            // while the other warps start this tile's matmuls.
            __threadfence();
            atomicExch(sem_row + prev_x, prev_rank + 1);
        }
        prev_x = it;
        prev_rank = rank;
        const T *q_s = sQ + buf * BM * LDK;
        const T *do_s = sdO + buf * BM * LDK;

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 key rows.
        float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            uint32_t ak[4], av[4];
            const int ar = 16 * w + (lane & 15), ac = kk * 16 + (lane >> 4) * 8;
            ldmatrix_x4(ak, smem_u32(sK + ar * LDK + ac));
            ldmatrix_x4(av, smem_u32(sV + ar * LDK + ac));
#pragma unroll
            for (int nb = 0; nb < BM / 16; ++nb) {
                uint32_t bq[4], bo[4];
                const int n = nb * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int kc = kk * 16 + (((lane >> 3) & 1) << 3);
                ldmatrix_x4(bq, smem_u32(q_s + n * LDK + kc));
                ldmatrix_x4(bo, smem_u32(do_s + n * LDK + kc));
                mma_16816<T>(s[2 * nb], ak, bq);
                mma_16816<T>(s[2 * nb + 1], ak, bq + 2);
                mma_16816<T>(dp[2 * nb], av, bo);
                mma_16816<T>(dp[2 * nb + 1], av, bo + 2);
            }
        }

        // P^T = exp2(S^T * scale * log2e * m [+ log2e * mask] - lse2),
        // dS'^T = m P^T (dP^T - delta).
        const int ksb = s_span[0], kse = s_span[1];  // key text span [ksb, kse)
        const int qsb = s_span[2], qse = s_span[3];  // query text span [qsb, qse)
        const bool kt0 = kr0 >= ksb && kr0 < kse, kt1 = kr1 >= ksb && kr1 < kse;
        // Uniform m over the key tile; never with a mask (its term is per element).
        const bool k_uniform =
            !masked && (jend <= ksb || j0 >= kse || (j0 >= ksb && jend <= kse));
        const bool k_text = j0 >= ksb && j0 < kse;
        const int iend = i0 + BM;
        const bool q_uniform = iend <= qsb || i0 >= qse || (i0 >= qsb && iend <= qse);
        const bool q_text = i0 >= qsb && i0 < qse;
        const float* lrow = sL + buf * BM;
        const float* drow = sDl + buf * BM;
        uint32_t ap[BM / 16][4], ads[BM / 16][4];
        if (k_uniform && q_uniform) {
            const float m = (k_text == q_text) ? 1.f : (q_text ? grev : gam);
            const float cf = lg * m;
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb) {
                const int col = nb * 8 + 2 * t;
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + col);
                const float2 dl = *reinterpret_cast<const float2 *>(drow + col);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = fast_exp2(s[nb][e] * cf - ((e & 1) ? l2.y : l2.x));
                    dp[nb][e] = p * (dp[nb][e] - ((e & 1) ? dl.y : dl.x)) * m;
                    s[nb][e] = p;
                }
            }
        } else if (!masked) {
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb) {
                const int col = nb * 8 + 2 * t;
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + col);
                const float2 dl = *reinterpret_cast<const float2 *>(drow + col);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = i0 + col + (e & 1);
                    const bool qt = qi >= qsb && qi < qse;
                    const bool kt = (e < 2) ? kt0 : kt1;
                    const float m = (qt == kt) ? 1.f : (qt ? grev : gam);
                    const float p = fast_exp2(s[nb][e] * (lg * m) - ((e & 1) ? l2.y : l2.x));
                    dp[nb][e] = p * (dp[nb][e] - ((e & 1) ? dl.y : dl.x)) * m;
                    s[nb][e] = p;
                }
            }
        } else if (a.mask_keys) {
            // A key mask: the thread's two key terms once per tile (as v6; the same sums)
            const float2 mk = key_mask_terms(a.mask, b * a.mask.b + (h0 + hh) * a.mask.h, kr0, Nk);
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb) {
                const int col = nb * 8 + 2 * t;
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + col);
                const float2 dl = *reinterpret_cast<const float2 *>(drow + col);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = i0 + col + (e & 1);
                    const bool qt = qi >= qsb && qi < qse;
                    const bool kt = (e < 2) ? kt0 : kt1;
                    const float m = (qt == kt) ? 1.f : (qt ? grev : gam);
                    const float mt = qi < N ? ((e < 2) ? mk.x : mk.y) : -INFINITY;
                    const float p =
                        fast_exp2(s[nb][e] * (lg * m) + mt - ((e & 1) ? l2.y : l2.x));
                    dp[nb][e] = p * (dp[nb][e] - ((e & 1) ? dl.y : dl.x)) * m;
                    s[nb][e] = p;
                }
            }
        } else {
            // Masked: + log2(e) mask_ij, read per element (S^T: key row kr, query column qi);
            // -inf outside N x Nk (padding rows / columns: P = 0, no out-of-bounds read).
            // Mask offsets of (b, h, i0 + 2t, kr0) and (.., kr1): element (qi, kr) adds
            // (qi - i0 - 2t) * mask.q (mask_log2 with that base, i = qi - i0 - 2t, j = 0).
            const int64_t mo0 = b * a.mask.b + (h0 + hh) * a.mask.h +
                                static_cast<int64_t>(i0 + 2 * t) * a.mask.q + kr0 * a.mask.k;
            const int64_t mo1 = mo0 + 8 * a.mask.k;
            const bool kin0 = kr0 < Nk, kin1 = kr1 < Nk;
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb) {
                const int col = nb * 8 + 2 * t;
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + col);
                const float2 dl = *reinterpret_cast<const float2 *>(drow + col);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = i0 + col + (e & 1);
                    const bool qt = qi >= qsb && qi < qse;
                    const bool kt = (e < 2) ? kt0 : kt1;
                    const float m = (qt == kt) ? 1.f : (qt ? grev : gam);
                    const float mt =
                        (qi < N && ((e < 2) ? kin0 : kin1))
                            ? mask_log2(a.mask, (e < 2) ? mo0 : mo1, nb * 8 + (e & 1), 0)
                            : -INFINITY;
                    const float p =
                        fast_exp2(s[nb][e] * (lg * m) + mt - ((e & 1) ? l2.y : l2.x));
                    dp[nb][e] = p * (dp[nb][e] - ((e & 1) ? dl.y : dl.x)) * m;
                    s[nb][e] = p;
                }
            }
        }
#pragma unroll
        for (int kb2 = 0; kb2 < BM / 16; ++kb2) {
            ap[kb2][0] = pack2<T>(s[2 * kb2][0], s[2 * kb2][1]);
            ap[kb2][1] = pack2<T>(s[2 * kb2][2], s[2 * kb2][3]);
            ap[kb2][2] = pack2<T>(s[2 * kb2 + 1][0], s[2 * kb2 + 1][1]);
            ap[kb2][3] = pack2<T>(s[2 * kb2 + 1][2], s[2 * kb2 + 1][3]);
            ads[kb2][0] = pack2<T>(dp[2 * kb2][0], dp[2 * kb2][1]);
            ads[kb2][1] = pack2<T>(dp[2 * kb2][2], dp[2 * kb2][3]);
            ads[kb2][2] = pack2<T>(dp[2 * kb2 + 1][0], dp[2 * kb2 + 1][1]);
            ads[kb2][3] = pack2<T>(dp[2 * kb2 + 1][2], dp[2 * kb2 + 1][3]);
            const int r = 16 * w + g, col = kb2 * 16 + 2 * t;
            *reinterpret_cast<uint32_t *>(sdS + r * LDS + col) = ads[kb2][0];
            *reinterpret_cast<uint32_t *>(sdS + (r + 8) * LDS + col) = ads[kb2][1];
            *reinterpret_cast<uint32_t *>(sdS + r * LDS + col + 8) = ads[kb2][2];
            *reinterpret_cast<uint32_t *>(sdS + (r + 8) * LDS + col + 8) = ads[kb2][3];
        }

        // dV += P^T dO, dK += dS'^T Q (this CTA's D-chunk).
#pragma unroll
        for (int kb2 = 0; kb2 < BM / 16; ++kb2) {
#pragma unroll
            for (int nb2 = 0; nb2 < DC / 16; ++nb2) {
                uint32_t bo[4], bq[4];
                const int kr = kb2 * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                const int nc = c0 + nb2 * 16 + ((lane >> 4) << 3);
                ldmatrix_x4_trans(bo, smem_u32(do_s + kr * LDK + nc));
                ldmatrix_x4_trans(bq, smem_u32(q_s + kr * LDK + nc));
                mma_16816<T>(acc_dv[2 * nb2], ap[kb2], bo);
                mma_16816<T>(acc_dv[2 * nb2 + 1], ap[kb2], bo + 2);
                mma_16816<T>(acc_dk[2 * nb2], ads[kb2], bq);
                mma_16816<T>(acc_dk[2 * nb2 + 1], ads[kb2], bq + 2);
            }
        }
        __syncthreads();  // dS^T complete in shared memory

        if (a.mode == kSkip) continue;
        // Ask for this tile's order before the dQ matmul, so the load's latency hides behind it.
        int polled = 0;
        if (ordered && tid == 0 && rank > 0) polled = ld_acquire(sem_row + it);
        // dQ partial (BM, DC) = dS' K: warp (wm, wn) owns rows 16 wm.., columns wn * DQN..
        float dq[DQN / 8][4];
#pragma unroll
        for (int i = 0; i < DQN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) dq[i][e] = 0.f;
#pragma unroll
        for (int kb2 = 0; kb2 < BN / 16; ++kb2) {
            uint32_t ad[4];
            const int mi = lane >> 3;
            const int sr = kb2 * 16 + ((mi >> 1) << 3) + (lane & 7);
            const int sc = 16 * wm + ((mi & 1) << 3);
            ldmatrix_x4_trans(ad, smem_u32(sdS + sr * LDS + sc));
#pragma unroll
            for (int nb2 = 0; nb2 < DQN / 16; ++nb2) {
                uint32_t bk[4];
                const int kr = kb2 * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                const int nc = c0 + wn * DQN + nb2 * 16 + ((lane >> 4) << 3);
                ldmatrix_x4_trans(bk, smem_u32(sK + kr * LDK + nc));
                mma_16816<T>(dq[2 * nb2], ad, bk);
                mma_16816<T>(dq[2 * nb2 + 1], ad, bk + 2);
            }
        }

        // Combine the key tiles' dQ parts (see taca_bwd.cu): one key tile alone writes dq;
        // otherwise float32 sums per chain in the workspace, reduced by bwd_dq_convert.
        const int qr0 = 16 * wm + g;
        const int qcol0 = c0 + wn * DQN + 2 * t;
        if (nk == 1) {
            T *dqb = static_cast<T *>(a.dq) + b * a.dqs_b + (h0 + hh) * a.dqs_h;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = qr0 + half * 8;
                if (i0 + r >= N) continue;
                T *dqrow = dqb + static_cast<int64_t>(i0 + r) * a.dqs_n;
#pragma unroll
                for (int nb = 0; nb < DQN / 8; ++nb)
                    store_pair<T>(dqrow, qcol0 + nb * 8, D, a.pair_store != 0,
                                  dq[nb][2 * half] * a.scale, dq[nb][2 * half + 1] * a.scale);
            }
            continue;
        }
        // Chain order: the link of rank r adds only after rank r - 1 released this query tile.
        const bool first = ordered ? rank == 0 : a.mode == kRacy;
        if (ordered && rank > 0) {
            if (tid == 0) {
                while (polled < rank) polled = ld_acquire(sem_row + it);
            }
            __syncthreads();
        }
        float *accp = (ordered ? acc_base : a.dq_acc + bh * a.Np * DP) +
                      static_cast<int64_t>(it) * BM * DP;  // head h0 + hh, rows i0..
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = qr0 + half * 8;
#pragma unroll
            for (int nb = 0; nb < DQN / 8; ++nb) {
                float *dst = accp + r * DP + qcol0 + nb * 8;
                if (first) __stcg(reinterpret_cast<float2 *>(dst),
                                  make_float2(dq[nb][2 * half], dq[nb][2 * half + 1]));
                else red_add2(dst, dq[nb][2 * half], dq[nb][2 * half + 1]);
            }
        }
    }
    if (ordered && prev_rank < seg_len - 1) {
        __syncthreads();
        if (tid == 0) {
            __threadfence();
            atomicExch(sem_row + prev_x, prev_rank + 1);
        }
    }
    // dK = scale * dK', dV (summed over the group): this thread's rows kr0, kr1 and D-chunk
    // columns of key/value head hk.
    store_dk_dv<T, DC / 8>(a, b, hk, Nk, D, kr0, kr1, c0, t, &acc_dk[0][0], &acc_dv[0][0]);
}

/* Launch preprocess + main for one (DP, DC, BM) configuration. Defined per head-dim file. */
template <typename T, int DP, int DC, int BM>
int launch_bwd(const BwdArgs &a_in, cudaStream_t stream) {
    constexpr size_t smem = Smem<DP, BM>::bytes;
    int dev = 0, smem_max = 0;
    TACA_CUDA_TRY(cudaGetDevice(&dev), "taca_bwd_cuda cudaGetDevice");
    TACA_CUDA_TRY(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                  "taca_bwd_cuda cudaDeviceGetAttribute");
    if (smem > static_cast<size_t>(smem_max)) return TACA_ERR_UNSUPPORTED;  // D > 128 before sm_90
    const int64_t rows = static_cast<int64_t>(a_in.B) * a_in.H * a_in.Np;
    int sms = 0;
    if (device_sm_count(&sms, "taca_bwd_cuda SM count") != TACA_OK) sms = 0;  // (unknown: no skew)
    BwdArgs a = a_in;
    apply_skew_rule(&a, sms);  // (the skew, and the chains it runs)
    int st = launch_preprocess<T, DP>(a, stream, "taca_bwd_cuda preprocess");
    if (st != TACA_OK) return st;
    const bool masked = a.mask.data != nullptr;
    auto kernel = masked ? bwd_main<T, DP, DC, BM, true> : bwd_main<T, DP, DC, BM, false>;
    TACA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)),
                  "taca_bwd_cuda cudaFuncSetAttribute");
    dim3 grid(a.nk, a.Hkv * (DP / DC), a.B);
    if (a.mode == kAtomic && a.nk > 1) {
        TACA_CUDA_TRY(cudaMemsetAsync(a.dq_acc, 0,
                                      static_cast<size_t>(rows) * DP * sizeof(float), stream),
                      "taca_bwd_cuda memset dq_acc");
    }
    kernel<<<grid, kThreads, smem, stream>>>(a);
    st = taca_cuda_check_launch("taca_bwd_cuda main");
    if (st != TACA_OK || a.nk == 1) return st;
    return launch_dq_convert<T, DP>(a, stream, "taca_bwd_cuda dq convert");
}

/* The configuration for a head dim: padded DP, chunk DC, query tile BM. */
struct Config {
    int dp, dc, bm;
};
inline Config config_for(int64_t head_dim) {
    if (head_dim <= 64) return {64, 64, 128};  // 128 beat 64 on H100: 3.64 vs 3.78 ms (v2)
    if (head_dim <= 128) return {128, 128, 64};
    return {256, 128, 32};
}

/* One launcher per padded head dim, each in its own .cu (parallel compiles). */
int launch_d64(const BwdArgs &a, cudaStream_t stream, bool bf16);
int launch_d128(const BwdArgs &a, cudaStream_t stream, bool bf16);
int launch_d256(const BwdArgs &a, cudaStream_t stream, bool bf16);

}  // namespace taca_bwd

#endif /* TACA_BWD_KERNEL_CUH_ */
