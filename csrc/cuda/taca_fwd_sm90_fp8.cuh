/*
 * taca_fwd_sm90_fp8.cuh: the opt-in FP8 (e4m3) forward for inference (taca_fwd_fp8_cuda), D = 128, Hopper.
 * Included by taca_fwd_sm90.cu only: it uses that file's row state, softmax and epilogue helpers.
 *
 * Quantization: three small kernels before the attention kernel, the same arithmetic as
 * taca.reference.quantize_fp8 (so the tests rebuild the kernel's exact fp8 inputs on the host):
 *   Q: one scale per (batch, head, 128-row tile): s = amax / 448 (1 where the tile is all zero), q8 =
 *      e4m3(q * (448 / amax)), every operation rounded to nearest (|q8| <= 448, e4m3's largest finite value);
 *      stored (B, H, N_q, 128) contiguous, the scales (B, H, N_q tiles).
 *   K: the same per 128-key tile (the attention kernel's key tile): (B, H_kv, N_k, 128), (B, H_kv, N_k tiles).
 *   V: one scale per (batch, KV head, channel) over all keys (P V sums V's rows over keys, so V's scale must
 *      not vary along them); the channel amax is a first pass (atomicMax of the float bits, every value >= 0),
 *      then V is stored transposed, (B, H_kv, 128, N_k rounded up to 16, zero past N_k), with the keys of each
 *      16-key group permuted as below.
 * Attention: the structure of taca_fwd_sm90_ws.cuh (one TMA producer warp; two consumer warpgroups of 64 rows
 * taking turns at the tensor cores; one CTA per SM walking the (query tile, head, batch) items; BR = 128 rows,
 * BC = 128-key tiles, K and V tiles 16 KB each) with FP8 products:
 *   S = Q8 K8^T   4 x wgmma m64n128k32 e4m3 (A and B K-major: a 128-channel fp8 row is one 128-byte swizzle row);
 *   softmax       softmax_tile with the row multipliers (scale log2(e), gamma) times s_q s_k of the tile;
 *   P -> e4m3     in registers: a thread's accumulator holds keys {2t, 2t+1, 8+2t, 9+2t} of each 16 (t = lane
 *                 % 4) where the k32 A fragment takes positions 4t..4t+3, so position p of a 16-key group of V8
 *                 holds key 2 (p / 4) + p % 2 + 8 ((p / 2) % 2): the same sum over keys, P packed with no shuffle;
 *   O += P8 V8    4 x wgmma m64n128k32, A = P8 from registers, B = the V8 tile (128 channel rows of 128 keys);
 *   epilogue      O times V's channel scales, / l; staged in a buffer of its own (Q's fp8 tile is half a 16-bit
 *                 O tile), 16-byte row stores of q's dtype.
 * lse and text_mass come from the fp32 softmax state (the exponentials before P is rounded to e4m3).
 */
#ifndef TACA_FWD_SM90_FP8_CUH_
#define TACA_FWD_SM90_FP8_CUH_

#include <cuda_fp8.h>
#include <string.h>

namespace taca_fwd90 {

using taca_fwd::Fp8Layout;

constexpr float FP8_MAX = 448.0f;  // e4m3's largest finite value

/* The quantization scale of a block whose largest magnitude is amax (>= 0), and the factor that quantizes it
 * (x8 = e4m3(x * inv)): both rounded divisions, 1 for an all-zero block. */
__device__ __forceinline__ float fp8_scale(float amax) { return amax > 0.0f ? __fdiv_rn(amax, FP8_MAX) : 1.0f; }
__device__ __forceinline__ float fp8_inv(float amax) { return amax > 0.0f ? __fdiv_rn(FP8_MAX, amax) : 1.0f; }

/* Four floats (already divided by the scale) to four e4m3 bytes, the first in the low byte. */
__device__ __forceinline__ uint32_t fp8x4(float a, float b, float c, float d) {
    const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
    const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
    return lo | (hi << 16);
}

/* 8 elements of T (one 16-byte chunk) to floats. */
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 &u, float (&x)[8]) {
    const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = to_float<T>(e[i]);
}

/* Block max over the 256 threads of a quantization CTA (red: 8 floats of shared memory). */
__device__ __forceinline__ float block_max256(float m, float *red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    m = red[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) m = fmaxf(m, red[w]);
    return m;
}

/* One 128-row x 128-channel tile of a (B, N, H, 128)-strided tensor: thread tid loads chunk c = tid % 16 (8
 * channels) of rows tid / 16 + 16 i, i < 8 (zeros past n). */
template <typename T>
__device__ __forceinline__ void load_tile8(const T *g, int64_t sn, int row0, int n, float (&x)[8][8]) {
    const int c = threadIdx.x & 15, r0 = threadIdx.x >> 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = row0 + r0 + 16 * i;
        uint4 u = make_uint4(0u, 0u, 0u, 0u);
        if (row < n) u = *reinterpret_cast<const uint4 *>(g + (int64_t)row * sn + c * 8);
        unpack8<T>(u, x[i]);
    }
}

/* Q or K: grid (tiles, heads, batch), 256 threads; one scale per tile. dst (B, heads, n, 128) e4m3 bytes. */
template <typename T>
__global__ void __launch_bounds__(256) fp8_quant_rows(const T *src, int64_t sb, int64_t sn, int64_t sh, int n,
                                                      uint8_t *dst, float *scales) {
    __shared__ float red[8];
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, heads = gridDim.y;
    const int row0 = t * 128;
    float x[8][8];
    load_tile8<T>(src + b * sb + h * sh, sn, row0, n, x);
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(x[i][e]));
    const float amax = block_max256(m, red), inv = fp8_inv(amax);
    if (threadIdx.x == 0) scales[((int64_t)b * heads + h) * gridDim.x + t] = fp8_scale(amax);
    const int c = threadIdx.x & 15, r0 = threadIdx.x >> 4;
    uint8_t *out = dst + (((int64_t)b * heads + h) * n) * 128 + c * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = row0 + r0 + 16 * i;
        float y[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = __fmul_rn(x[i][e], inv);
        if (row < n)
            *reinterpret_cast<uint2 *>(out + (int64_t)row * 128) =
                make_uint2(fp8x4(y[0], y[1], y[2], y[3]), fp8x4(y[4], y[5], y[6], y[7]));
    }
}

/* V, first pass: grid (key tiles, KV heads, batch); each channel's amax over the tile, atomicMax'ed (as float
 * bits: every value >= 0) into vmax (B, H_kv, 128), zeroed by the launcher. */
template <typename T>
__global__ void __launch_bounds__(256) fp8_vmax(const T *src, int64_t sb, int64_t sn, int64_t sh, int n,
                                                unsigned int *vmax) {
    __shared__ float part[16][128];
    const int h = blockIdx.y, b = blockIdx.z;
    float x[8][8];
    load_tile8<T>(src + b * sb + h * sh, sn, blockIdx.x * 128, n, x);
    const int c = threadIdx.x & 15, r0 = threadIdx.x >> 4;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        float m = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(x[i][e]));
        part[r0][c * 8 + e] = m;
    }
    __syncthreads();
    if (threadIdx.x < 128) {
        float m = 0.0f;
#pragma unroll
        for (int r = 0; r < 16; ++r) m = fmaxf(m, part[r][threadIdx.x]);
        atomicMax(vmax + ((int64_t)b * gridDim.y + h) * 128 + threadIdx.x, __float_as_uint(m));
    }
}

/* V, second pass: grid (key tiles, KV heads, batch); v8 (B, H_kv, 128, nk16) e4m3 bytes, transposed and permuted.
 * The tile is staged in shared memory as q's dtype (skewed rows, below); then warp w writes channel rows w, w + 8, ..: lane l makes
 * the row's word l, positions 4l..4l + 3 = keys 16 (l / 4) + 2 (l % 4) + {0, 1, 8, 9} (the header's permutation),
 * one coalesced 128-byte store per row. */
template <typename T>
__global__ void __launch_bounds__(256) fp8_quant_v(const T *src, int64_t sb, int64_t sn, int64_t sh, int n, int nk16,
                                                   const unsigned int *vmax, uint8_t *v8) {
    __shared__ uint32_t tile[128 * 64 + 15 + 249];
    __shared__ float inv[128];
    const int h = blockIdx.y, b = blockIdx.z, k0 = blockIdx.x * 128;
    // word of key k's row: rows 64 words long, key k = 16 a + r at 64 k + r + (36 a - 3 (a % 2)), a skew that is
    // 0, 1, 8, 9, .., 25 mod 32 by 16-key group and grows by >= 15 words (no overlap); a warp's 32 reads of one
    // channel (keys 16 a + 2 t + e) then fall in 32 distinct banks
    auto kw = [](int k) { return k * 64 + (k & 15) + 36 * (k >> 4) - 3 * ((k >> 4) & 1); };
    {
        const T *g = src + b * sb + h * sh;
        const int c = threadIdx.x & 15, r0 = threadIdx.x >> 4;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int k = r0 + 16 * i;
            uint4 u = make_uint4(0u, 0u, 0u, 0u);
            if (k0 + k < n) u = *reinterpret_cast<const uint4 *>(g + (int64_t)(k0 + k) * sn + c * 8);
            uint32_t *d = tile + kw(k) + 4 * c;
            d[0] = u.x, d[1] = u.y, d[2] = u.z, d[3] = u.w;
        }
        if (threadIdx.x < 128)
            inv[threadIdx.x] = fp8_inv(__uint_as_float(vmax[((int64_t)b * gridDim.y + h) * 128 + threadIdx.x]));
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kb = 16 * (lane >> 2) + 2 * (lane & 3);
    const int w0 = kw(kb), w1 = kw(kb + 1), w8 = kw(kb + 8), w9 = kw(kb + 9);
    const bool ok = k0 + 16 * (lane >> 2) < nk16;
    const T *e = reinterpret_cast<const T *>(tile);
    uint8_t *out = v8 + (((int64_t)b * gridDim.y + h) * 128) * nk16 + k0 + 4 * lane;
    for (int ch = warp; ch < 128; ch += 8) {
        const float s = inv[ch];
        const uint32_t word = fp8x4(__fmul_rn(to_float<T>(e[2 * w0 + ch]), s), __fmul_rn(to_float<T>(e[2 * w1 + ch]), s),
                                    __fmul_rn(to_float<T>(e[2 * w8 + ch]), s), __fmul_rn(to_float<T>(e[2 * w9 + ch]), s));
        if (ok) *reinterpret_cast<uint32_t *>(out + (int64_t)ch * nk16) = word;
    }
}

template <int STAGES_, bool OVERLAP_ = false>
struct Fp8Cfg {
    static constexpr int DP = 128, BC = 128, BR = 128, STAGES = STAGES_;
    // OVERLAP: the softmax of S_j starts once S_j landed, with P_{j-1} V_{j-1} still running (O rescaled after it)
    static constexpr bool OVERLAP = OVERLAP_;
    static constexpr int THREADS = 384;
    static constexpr int NT = BC / 8, DT = DP / 8;
    static constexpr uint32_t Q_BYTES = BR * DP;    // e4m3
    static constexpr uint32_t KV_BYTES = BC * DP;   // one K tile (keys x channels) or one V8 tile (channels x keys)
    static constexpr uint32_t O_BYTES = BR * DP * 2;  // the 16-bit O staging tile
    static constexpr size_t SMEM = 2 * Q_BYTES + 2 * STAGES * KV_BYTES + O_BYTES + 1024;
    static_assert(SMEM <= 232448, "shared memory");
};

struct Fp8Args {
    CUtensorMap tq, tk, tv;
    FwdArgs a;  // q / k / v unused here (the maps and scales below hold the quantized inputs)
    const float *qs, *ks;
    const unsigned int *vmax;
    int heads, items, nqt, nkt;
};

/* P (the exponentials, accumulator layout) as the e4m3 A fragments of the four k32 steps of O += P V8. */
__device__ __forceinline__ void pack_p8(uint32_t (&pa)[4][4], const float (&s)[1][16][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const int nb = 4 * kk;
        pa[kk][0] = fp8x4(s[0][nb][0], s[0][nb][1], s[0][nb + 1][0], s[0][nb + 1][1]);
        pa[kk][1] = fp8x4(s[0][nb][2], s[0][nb][3], s[0][nb + 1][2], s[0][nb + 1][3]);
        pa[kk][2] = fp8x4(s[0][nb + 2][0], s[0][nb + 2][1], s[0][nb + 3][0], s[0][nb + 3][1]);
        pa[kk][3] = fp8x4(s[0][nb + 2][2], s[0][nb + 2][3], s[0][nb + 3][2], s[0][nb + 3][3]);
    }
}

template <typename T, typename C>
__global__ void __launch_bounds__(C::THREADS, 1) taca_fwd_fp8_kernel(const __grid_constant__ Fp8Args p) {
#if TACA_SM90A
    constexpr int BC = C::BC, BR = C::BR, NT = C::NT, DT = C::DT, STAGES = C::STAGES;
    constexpr int BAR_TURN = 1;  // named barriers 1, 2: consumer 0's and consumer 1's turn
    typedef __nv_fp8_e4m3 E;
    const FwdArgs &a = p.a;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Q full [2], Q empty [2], full K, full V, empty K, empty V
    __shared__ __align__(8) uint64_t bars[4 + 4 * STAGES];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sq = (raw + 1023u) & ~1023u;  // 2 Q buffers
    unsigned char *const smem = smem_raw + (sq - raw);
    const uint32_t sk = sq + 2 * C::Q_BYTES;     // STAGES K buffers
    const uint32_t sv = sk + STAGES * C::KV_BYTES;
    unsigned char *const smem_o = smem + (sv + STAGES * C::KV_BYTES - sq);  // O staging
    const uint32_t bar0 = smem_u32(&bars[0]);
    auto full_q = [&](int qb) { return bar0 + 8u * qb; };
    auto empty_q = [&](int qb) { return bar0 + 8u * (2 + qb); };
    auto full_k = [&](int s) { return bar0 + 8u * (4 + s); };
    auto full_v = [&](int s) { return bar0 + 8u * (4 + STAGES + s); };
    auto empty_k = [&](int s) { return bar0 + 8u * (4 + 2 * STAGES + s); };
    auto empty_v = [&](int s) { return bar0 + 8u * (4 + 3 * STAGES + s); };

    const int tid = threadIdx.x, wg = tid >> 7;
    const int n = a.n, nk = a.nk, heads = p.heads, nqt = p.nqt, nkv = p.nkt;
    const int w0 = static_cast<int>(blockIdx.x), wend = p.items, wstep = static_cast<int>(gridDim.x);
    auto decode = [&](int w, int &qt, int &h, int &b) {
        qt = w % nqt;
        const int r = w / nqt;
        h = r % heads;
        b = r / heads;
    };

    if (tid == 0) {
        for (int qb = 0; qb < 2; ++qb) {
            mbar_init(full_q(qb), 1);
            mbar_init(empty_q(qb), 256);
        }
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_k(s), 1);
            mbar_init(full_v(s), 1);
            mbar_init(empty_k(s), 8);
            mbar_init(empty_v(s), 8);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (tid == 0) {
            tma_prefetch_desc(&p.tq);
            tma_prefetch_desc(&p.tk);
            tma_prefetch_desc(&p.tv);
            int jg = 0;  // K / V tiles issued so far: the ring position continues across items
            for (int w = w0, i = 0; w < wend; w += wstep, ++i) {
                int qt, h, b;
                decode(w, qt, h, b);
                const int hk = h / a.group, qb = i & 1;
                if (i >= 2) mbar_wait(empty_q(qb), ((i >> 1) - 1) & 1);
                mbar_arrive_expect_tx(full_q(qb), C::Q_BYTES);
                tma_load_4d(sq + qb * C::Q_BYTES, &p.tq, full_q(qb), 0, qt * BR, h, b);
                for (int j = 0; j < nkv; ++j, ++jg) {
                    const int s = jg % STAGES, r = jg / STAGES;
                    const uint32_t off = s * C::KV_BYTES;
                    if (r > 0) mbar_wait(empty_k(s), (r - 1) & 1);
                    mbar_arrive_expect_tx(full_k(s), C::KV_BYTES);
                    tma_load_4d(sk + off, &p.tk, full_k(s), 0, j * BC, hk, b);
                    if (r > 0) mbar_wait(empty_v(s), (r - 1) & 1);
                    mbar_arrive_expect_tx(full_v(s), C::KV_BYTES);
                    tma_load_4d(sv + off, &p.tv, full_v(s), j * BC, 0, hk, b);
                }
            }
        }
        return;
    }
    setmaxnreg_inc<240>();

    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
    const int wrow0 = c * 64 + warp * 16;
    auto pv_product = [](float (&o_)[1][DT][4], const uint32_t (&p_)[4][4], uint32_t vbuf) {
        const uint64_t d_v = desc_sw128(vbuf);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_rs<E, 128, 0>(&o_[0][0][0], p_[kk], desc_advance(d_v, kk * 32), 1);
    };

    int jbase = 0;
    for (int w = w0, i = 0; w < wend; w += wstep, ++i, jbase += nkv) {
        int qt, h, b;
        decode(w, qt, h, b);
        const int q0 = qt * BR, qb = i & 1, hk = h / a.group;
        const int tb = a.tb, te = a.te;
        const float g = a.gamma[b];
        float mul_txt[1][2], mul_vis[1][2], o[1][DT][4], m_run[1][2], l_run[1][2], t_run[1][2];
        init_row_state<DT>(a, g, a.qtb, a.qte, q0, wrow0, lane, mul_txt, mul_vis, o, m_run, l_run, t_run);
        {  // Q's tile scale into the row multipliers; each key tile's scale comes in per tile
            const float sqs = p.qs[((int64_t)b * heads + h) * nqt + qt];
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                mul_txt[0][hf] *= sqs;
                mul_vis[0][hf] *= sqs;
            }
        }
        const float *const ksc = p.ks + ((int64_t)b * (heads / a.group) + hk) * nkv;
        const uint32_t sqb = sq + qb * C::Q_BYTES;
        const uint64_t d_qw = desc_sw128(sqb + c * 64 * 128);  // this warpgroup's 64 rows

        mbar_wait(full_q(qb), (i >> 1) & 1);
        if (c == 1) named_bar_arrive(BAR_TURN + 0, 256);  // consumer 0 takes the first turn
        uint32_t pa[4][4];
        auto tile = [&](const int j, auto first) {
            constexpr bool FIRST = decltype(first)::value;
            const int jg = jbase + j;
            const int k0 = j * BC, s = jg % STAGES, sp = (jg + STAGES - 1) % STAGES;
            const float skj = __ldg(ksc + j);
            mbar_wait(full_k(s), (jg / STAGES) & 1);
            if (!FIRST) mbar_wait(full_v(sp), ((jg - 1) / STAGES) & 1);
            named_bar_sync(BAR_TURN + c, 256);

            float sacc[1][NT][4];
            fence_regs<DT * 4>(&o[0][0][0]);
            fence_regs<16>(&pa[0][0]);
            const uint64_t d_kj = desc_sw128(sk + s * C::KV_BYTES);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                wgmma_ss<E, 128, 0, 0>(&sacc[0][0][0], desc_advance(d_qw, kk * 32), desc_advance(d_kj, kk * 32), kk > 0);
            wgmma_commit();  // group: S_j
            if constexpr (!FIRST) {
                pv_product(o, pa, sv + sp * C::KV_BYTES);
                wgmma_commit();  // group: P_{j-1} V_{j-1}
            }
            if (c == 0 || j + 1 < nkv) named_bar_arrive(BAR_TURN + (1 - c), 256);
            constexpr bool LATE_O = C::OVERLAP && !FIRST;  // O and P still in flight during the softmax
            if constexpr (LATE_O) {
                wgmma_wait<1>();
            } else {
                wgmma_wait<0>();
                fence_regs<DT * 4>(&o[0][0][0]);
                fence_regs<16>(&pa[0][0]);
            }
            fence_regs<NT * 4>(&sacc[0][0][0]);
            if (lane == 0) {
                mbar_arrive(empty_k(s));
                if (!FIRST && !LATE_O) mbar_arrive(empty_v(sp));
            }
            float mt[1][2], mv[1][2], alpha[1][2];
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                mt[0][hf] = mul_txt[0][hf] * skj;
                mv[0][hf] = mul_vis[0][hf] * skj;
            }
            const int k1 = k0 + BC;
            if (a.scale_log2 >= 0.0f && k1 <= nk && (k1 <= tb || k0 >= te))
                taca_fwd::softmax_tile<taca_fwd::TILE_VIS, !LATE_O>(sacc, o, m_run, l_run, t_run, mt, mv, k0, nk, tb, te, lane,
                                                                    alpha, a.mask, 0, 0, n);
            else if (a.scale_log2 >= 0.0f && k1 <= nk && k0 >= tb && k1 <= te)
                taca_fwd::softmax_tile<taca_fwd::TILE_TXT, !LATE_O>(sacc, o, m_run, l_run, t_run, mt, mv, k0, nk, tb, te, lane,
                                                                    alpha, a.mask, 0, 0, n);
            else
                taca_fwd::softmax_tile<taca_fwd::TILE_MIXED, !LATE_O>(sacc, o, m_run, l_run, t_run, mt, mv, k0, nk, tb, te,
                                                                      lane, alpha, a.mask, 0, 0, n);
            if constexpr (LATE_O) {
                wgmma_wait<0>();  // P_{j-1} V_{j-1} landed: O and P are free again
                fence_regs<DT * 4>(&o[0][0][0]);
                fence_regs<16>(&pa[0][0]);
                if (lane == 0) mbar_arrive(empty_v(sp));
                rescale_o<DT>(o, alpha);
            }
            pack_p8(pa, sacc);
        };
        tile(0, std::true_type());
        for (int j = 1; j < nkv; ++j) tile(j, std::false_type());
        {  // the last tile's P V, then its V buffer is free
            const int jl = jbase + nkv - 1, sl = jl % STAGES;
            mbar_wait(full_v(sl), (jl / STAGES) & 1);
            fence_regs<DT * 4>(&o[0][0][0]);
            fence_regs<16>(&pa[0][0]);
            wgmma_fence();
            pv_product(o, pa, sv + sl * C::KV_BYTES);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs<DT * 4>(&o[0][0][0]);
            if (lane == 0) mbar_arrive(empty_v(sl));
        }
        // the Q buffer is free once every consumer's last S product read it (all complete here)
        mbar_arrive(empty_q(qb));

        // V's channel scales: this thread's columns dt * 8 + 2 (lane % 4) + e
        const unsigned int *vm = p.vmax + ((int64_t)b * (heads / a.group) + hk) * 128 + 2 * (lane & 3);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            const float s0 = fp8_scale(__uint_as_float(__ldg(vm + dt * 8)));
            const float s1 = fp8_scale(__uint_as_float(__ldg(vm + dt * 8 + 1)));
            o[0][dt][0] *= s0;
            o[0][dt][1] *= s1;
            o[0][dt][2] *= s0;
            o[0][dt][3] *= s1;
        }
        const int64_t bh_row = ((int64_t)b * heads + h) * n;
        // this warp's own 16 rows of the staging tile: its stores of the previous item are done (same warp)
        normalize_stage_o<T, DT, BR>(a, o, m_run, l_run, t_run, bh_row, q0, wrow0, lane, n, smem_o);
        __syncwarp();
        T *go = static_cast<T *>(a.out) + b * a.ob + h * a.oh;
        constexpr int CPR = C::DP / 8;
        for (int i2 = lane; i2 < 16 * CPR; i2 += 32) {
            const int r = i2 / CPR, cc = i2 % CPR;
            const int row = q0 + wrow0 + r;
            if (row < n)
                *reinterpret_cast<uint4 *>(go + (int64_t)row * a.on + cc * 8) =
                    *reinterpret_cast<const uint4 *>(smem_o + sw128_offset<BR>(wrow0 + r, cc));
        }
        __syncwarp();
    }  // items
#else
    (void)p;
#endif
}

/* A 4-d TMA map of a contiguous byte tensor (dims innermost first), box {box0, box1, 1, 1}, 128B swizzle. */
static inline bool encode_u8_map(CUtensorMap *m, const void *base, const int64_t (&dims)[4], int box0, int box1) {
    EncodeTiledFn fn = encode_tiled_fn();
    if (!fn) return false;
    cuuint64_t d[4], st[3];
    int64_t stride = 1;
    for (int i = 0; i < 4; ++i) {
        d[i] = (cuuint64_t)dims[i];
        if (i > 0) st[i - 1] = (cuuint64_t)stride;
        stride *= dims[i];
    }
    cuuint32_t box[4] = {(cuuint32_t)box0, (cuuint32_t)box1, 1, 1}, estr[4] = {1, 1, 1, 1};
    return fn(m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<void *>(base), d, st, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* Quantize q, k, v into the workspace (taca_fwd::fp8_layout), then the attention kernel of configuration C. */
template <typename T, typename C>
int launch_fp8_cfg(const FwdArgs &a, int batch, int heads, void *ws, cudaStream_t stream) {
    auto kernel = taca_fwd_fp8_kernel<T, C>;
    const int hkv = heads / a.group;
    const Fp8Layout L = taca_fwd::fp8_layout(batch, heads, hkv, a.n, a.nk);
    const int64_t items = (int64_t)L.nqt * heads * batch;
    if (items > INT32_MAX) return TACA_ERR_UNSUPPORTED;
    cudaFuncAttributes attr;
    TACA_CUDA_TRY(cudaFuncGetAttributes(&attr, kernel), "taca_fwd_fp8_cuda: cudaFuncGetAttributes");
    if (attr.binaryVersion != 90) return TACA_ERR_UNSUPPORTED;
    unsigned char *w = static_cast<unsigned char *>(ws);
    uint8_t *q8 = w + L.q8, *k8 = w + L.k8, *v8 = w + L.v8;
    float *qs = reinterpret_cast<float *>(w + L.qs), *ks = reinterpret_cast<float *>(w + L.ks);
    unsigned int *vmax = reinterpret_cast<unsigned int *>(w + L.vs);
    Fp8Args p;
    memset(&p, 0, sizeof(p));
    p.a = a;
    p.qs = qs;
    p.ks = ks;
    p.vmax = vmax;
    p.heads = heads;
    p.items = static_cast<int>(items);
    p.nqt = L.nqt;
    p.nkt = L.nkt;
    const int64_t qdims[4] = {128, a.n, heads, batch}, kdims[4] = {128, a.nk, hkv, batch};
    const int64_t vdims[4] = {L.nk16, 128, hkv, batch};
    if (!encode_u8_map(&p.tq, q8, qdims, 128, 128) || !encode_u8_map(&p.tk, k8, kdims, 128, 128) ||
        !encode_u8_map(&p.tv, v8, vdims, 128, 128))
        return TACA_ERR_UNSUPPORTED;
    int sms = 0;
    const int st = device_sm_count(&sms, "taca_fwd_fp8_cuda: SM count");
    if (st != TACA_OK) return st;
    TACA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM),
                  "taca_fwd_fp8_cuda: cudaFuncSetAttribute");

    const T *q = static_cast<const T *>(a.q), *k = static_cast<const T *>(a.k), *v = static_cast<const T *>(a.v);
    TACA_CUDA_TRY(cudaMemsetAsync(vmax, 0, (size_t)batch * hkv * 128 * 4, stream), "taca_fwd_fp8_cuda: memset");
    fp8_quant_rows<T><<<dim3(L.nqt, heads, batch), 256, 0, stream>>>(q, a.qb, a.qn, a.qh, a.n, q8, qs);
    fp8_quant_rows<T><<<dim3(L.nkt, hkv, batch), 256, 0, stream>>>(k, a.kb, a.kn, a.kh, a.nk, k8, ks);
    fp8_vmax<T><<<dim3(L.nkt, hkv, batch), 256, 0, stream>>>(v, a.vb, a.vn, a.vh, a.nk, vmax);
    fp8_quant_v<T><<<dim3(L.nkt, hkv, batch), 256, 0, stream>>>(v, a.vb, a.vn, a.vh, a.nk, L.nk16, vmax, v8);
    const int rc = taca_cuda_check_launch("taca_fwd_fp8_cuda: quantization");
    if (rc != TACA_OK) return rc;
    kernel<<<static_cast<unsigned>(items < sms ? items : sms), C::THREADS, C::SMEM, stream>>>(p);
    return taca_cuda_check_launch("taca_fwd_fp8_cuda: kernel launch");
}

/* variant: the K / V ring's stages, 0 = 3 (the default; 2 and 3 measured within noise of each other on FLUX shapes,
 * H200, KERNEL_LOG), 2, 3 or 4; + 10: the intra-warpgroup overlap (OVERLAP; measured 1-6% slower). */
template <typename T>
int launch_fp8(const FwdArgs &a, int variant, int batch, int heads, void *ws, cudaStream_t stream) {
    const int stages = variant % 10 == 2 ? 2 : variant % 10 == 4 ? 4 : 3;
    const bool ovl = variant >= 10;
    if (stages == 2)
        return ovl ? launch_fp8_cfg<T, Fp8Cfg<2, true>>(a, batch, heads, ws, stream)
                   : launch_fp8_cfg<T, Fp8Cfg<2>>(a, batch, heads, ws, stream);
    if (stages == 4)
        return ovl ? launch_fp8_cfg<T, Fp8Cfg<4, true>>(a, batch, heads, ws, stream)
                   : launch_fp8_cfg<T, Fp8Cfg<4>>(a, batch, heads, ws, stream);
    return ovl ? launch_fp8_cfg<T, Fp8Cfg<3, true>>(a, batch, heads, ws, stream)
               : launch_fp8_cfg<T, Fp8Cfg<3>>(a, batch, heads, ws, stream);
}

}  // namespace taca_fwd90

#endif  /* TACA_FWD_SM90_FP8_CUH_ */
