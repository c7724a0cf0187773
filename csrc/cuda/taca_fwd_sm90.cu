/*
 * taca_fwd_sm90.cu: Hopper (sm_90a) forward of gamma-scaled joint attention with wgmma.
 *
 * Same math, arguments and outputs as the mma.sync kernel (taca_fwd.cu); used for aligned
 * inputs with D = 64, 72..128 or 200..256 when the device is compute capability 9.0 and this file
 * was built for sm_90a (setup.py defines TACA_HAVE_SM90A then); D = 72..120 (Lumina 2's 96) runs the
 * D = 128 tiles with zero-filled columns (the warp-specialized TMA kernel since the forty-seventh session, the
 * cp.async one before), and D = 200..256 (AuraFlow, Ideogram 4) the D = 256 tiles of this file's kernel.
 * Everything else takes the mma.sync path.
 *
 * CTA = WG warpgroups (128 threads each); warpgroup w owns query rows [64w, 64w + 64) of the
 * CTA's BR = 64 * WG rows. Q (BR x D), and STAGES buffers of K and V tiles (BC keys x D) live
 * in shared memory in the 128-byte-swizzled layout of taca_sm90.cuh, filled by cp.async from
 * all threads (K/V_{j+STAGES} loads are issued as soon as tile j is consumed). Per key tile:
 *   S = Q K^T      D/16 wgmma m64n{BC}k16, A and B from shared memory (both K-major);
 *   softmax        the mma.sync kernel's softmax_tile (same fragment layout: TACA multiplier,
 *                  base-2 online softmax, text-mass running sum), P packed to bf16/fp16 registers;
 *   O += P V       BC/16 x D/64 wgmma m64n64k16, A = P from registers, B = V (N-major).
 * Accumulators (S: BC/2, O: D/2 fp32 per thread) stay in registers. The epilogue stages O in
 * the warpgroup's own Q rows (same swizzle) and writes 16-byte rows.
 *
 * At D = 128 and D = 64 the default is the warp-specialized kernel of taca_fwd_sm90_ws.cuh (TMA loads,
 * mbarrier pipeline, consumer warpgroups taking turns: two at D = 128, three at D = 64); this file's kernel is its
 * fallback where no TMA map can be encoded (variant 13), and the D = 256 kernel.
 *
 * Kernel versions and measured speeds: benchmarks/results/KERNEL_LOG.md.
 */
#include <stdlib.h>
#include <type_traits>

#include "taca_fwd_kernel.cuh"
#include "taca_sm90.cuh"

namespace taca_fwd90 {

using namespace taca_cuda;
using namespace taca_sm90;
using namespace taca_wgmma;
using taca_fwd::FwdArgs;

template <int DP_, int BC_, int WG_, int STAGES_, bool OVERLAP_ = false>
struct Cfg {
    static constexpr int DP = DP_, BC = BC_, WG = WG_, STAGES = STAGES_;
    static constexpr bool OVERLAP = OVERLAP_;  // P V of tile j-1 in flight during softmax of tile j
    static constexpr int THREADS = WG * 128;
    static constexpr int BR = WG * 64;
    static constexpr int NT = BC / 8;  // 8-column tiles of S per thread row pair
    static constexpr int DT = DP / 8;  // 8-column tiles of O
    static constexpr uint32_t Q_BYTES = BR * DP * 2;
    static constexpr uint32_t KV_BYTES = BC * DP * 2;  // one K or one V buffer
    static constexpr size_t SMEM = Q_BYTES + 2 * STAGES * KV_BYTES + 1024;  // + alignment slack
    // D = 64, 2 warpgroups, no overlap: 2 CTAs per SM need <= 128 registers (it needs ~127;
    // the cap keeps the grouped-KV-head index math from tipping it over).
    static constexpr int MINB = (DP == 64 && WG == 2 && !OVERLAP) ? 2 : 1;
    static_assert(DP % 64 == 0 && BC % 16 == 0 && (BC == 64 || BC == 128), "tile shape");
    static_assert(!OVERLAP || STAGES >= 2, "the overlapped loop keeps two tiles resident");
};

/* FEAT: per-sample spans and a mask, as in taca_fwd_kernel (taca_fwd_kernel.cuh). */
/* O *= alpha per row (the running max moved), for the warp's two rows. */
template <int DT>
__device__ __forceinline__ void rescale_o(float (&o)[1][DT][4], const float (&alpha)[1][2]) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
        o[0][dt][0] *= alpha[0][0];
        o[0][dt][1] *= alpha[0][0];
        o[0][dt][2] *= alpha[0][1];
        o[0][dt][3] *= alpha[0][1];
    }
}

/* P (the exponentials in the S accumulator layout) packed as the A fragments of the P V product. */
template <typename T, int BC>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[BC / 16][4], const float (&s)[1][BC / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
        pa[kk][0] = pack2<T>(s[0][2 * kk][0], s[0][2 * kk][1]);
        pa[kk][1] = pack2<T>(s[0][2 * kk][2], s[0][2 * kk][3]);
        pa[kk][2] = pack2<T>(s[0][2 * kk + 1][0], s[0][2 * kk + 1][1]);
        pa[kk][3] = pack2<T>(s[0][2 * kk + 1][2], s[0][2 * kk + 1][3]);
    }
}

/* The WS kernels' uniform tiles (every key of the tile text, or every one visual; no mask; mul >= 0) with WsCfg's IL:
 * the same fp32 operations on every value as taca_fwd::softmax_tile<TILE_VIS / TILE_TXT> (the row max as its tree, the
 * row sums in its order) and pack_p, so the same outputs; what differs is the order in the source: both rows' maxima
 * first, then per 8-key column tile the four exponentials and, with SCALE_O (no P V product in flight, so O and pa are
 * free), O's rescale of one 8-column tile and, every second column tile, P's four packed registers, so that ptxas can
 * fill the exponentials' issue gaps with them (without SCALE_O the caller rescales and packs after its wait). txt:
 * the tile's keys are text (text mass summed). mul: the rows' multipliers for this tile's kind. */
/* LAZY (WsCfg's LZ, FlashAttention-4's rule): the running max moves only when some row of the warp would grow by more
 * than LAZY_LOG2 (base 2); otherwise every row keeps its max, the tile's exponentials stay below 2^LAZY_LOG2 (P in bf16
 * and the fp32 sums hold that), alpha is 1 and O is not rescaled. Returns whether O needs the rescale by alpha_out (a
 * warp-uniform value). Not bitwise the default: the exponentials are taken against another max. */
[[maybe_unused]] constexpr float LAZY_LOG2 = 8.0f;  // (unreferenced in builds without sm_90a)
template <typename T, bool SCALE_O, int NT, int DT, bool LAZY = false>
__device__ __forceinline__ bool softmax_uniform_il(float (&s)[1][NT][4], float (&o)[1][DT][4], float (&m_run)[1][2],
                                                   float (&l_run)[1][2], float (&t_run)[1][2], const float (&mul)[1][2],
                                                   bool txt, float (&alpha_out)[1][2], uint32_t (&pa)[NT / 2][4]) {
    static_assert(NT % 2 == 0, "key tile: whole 16-key steps");
    float mb[2], al[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float v[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) v[nt] = fmaxf(s[0][nt][hf * 2], s[0][nt][hf * 2 + 1]);
#pragma unroll
        for (int st = 1; st < NT; st *= 2)
#pragma unroll
            for (int i = 0; i + st < NT; i += 2 * st) v[i] = fmaxf(v[i], v[i + st]);
        mb[hf] = fmaxf(m_run[0][hf], v[0] * mul[0][hf]);
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) mb[hf] = fmaxf(mb[hf], __shfl_xor_sync(0xffffffffu, mb[hf], 1));
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) mb[hf] = fmaxf(mb[hf], __shfl_xor_sync(0xffffffffu, mb[hf], 2));
    bool moved = true;
    if constexpr (LAZY)
        moved = __any_sync(0xffffffffu, mb[0] > m_run[0][0] + LAZY_LOG2 || mb[1] > m_run[0][1] + LAZY_LOG2);
    if (moved) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float mx = mb[hf];
            mb[hf] = mx == -INFINITY ? 0.0f : mx;
            al[hf] = taca_cuda::fast_exp2(m_run[0][hf] - mb[hf]);
            m_run[0][hf] = mx;
            alpha_out[0][hf] = al[hf];
        }
    } else {  // LAZY: every row keeps its max (-inf only where the row saw no finite logit yet, nor does it now)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            mb[hf] = m_run[0][hf] == -INFINITY ? 0.0f : m_run[0][hf];
            al[hf] = 1.0f, alpha_out[0][hf] = 1.0f;
        }
    }
    float ls[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pr = taca_cuda::fast_exp2(fmaf(s[0][nt][hf * 2 + e], mul[0][hf], -mb[hf]));
                s[0][nt][hf * 2 + e] = pr;
                ls[hf] += pr;
            }
        if constexpr (SCALE_O && !LAZY) {
            if (nt < DT) {
#pragma unroll
                for (int c = 0; c < 4; ++c) o[0][nt][c] *= al[c >> 1];
            }
        }
        if (SCALE_O && (nt & 1)) {  // (not while a P V product in flight reads pa and O: the caller packs after it)
            const int kk = nt >> 1;
            pa[kk][0] = pack2<T>(s[0][2 * kk][0], s[0][2 * kk][1]);
            pa[kk][1] = pack2<T>(s[0][2 * kk][2], s[0][2 * kk][3]);
            pa[kk][2] = pack2<T>(s[0][2 * kk + 1][0], s[0][2 * kk + 1][1]);
            pa[kk][3] = pack2<T>(s[0][2 * kk + 1][2], s[0][2 * kk + 1][3]);
        }
    }
    if constexpr (SCALE_O && !LAZY) {
#pragma unroll
        for (int dt = NT; dt < DT; ++dt)
#pragma unroll
            for (int c = 0; c < 4; ++c) o[0][dt][c] *= al[c >> 1];
    }
    if constexpr (SCALE_O && LAZY) {  // the rare tile that moved the max: a branch of its own
        if (moved) {
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
#pragma unroll
                for (int c = 0; c < 4; ++c) o[0][dt][c] *= al[c >> 1];
        }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        l_run[0][hf] = l_run[0][hf] * al[hf] + ls[hf];
        // fmaf: softmax_tile's t * alpha + ls is one FFMA; written as `txt ? t * al + ls : t * al` ptxas shares the
        // product (an FMUL, then an FADD where txt): other last bits of text_mass (TX's test, forty-third session)
        t_run[0][hf] = txt ? fmaf(t_run[0][hf], al[hf], ls[hf]) : t_run[0][hf] * al[hf];
    }
    return moved;
}

/* Epilogue, first half: each row's sum and text mass reduced over its quad, lse and text_mass written
 * (rows < n), and O / l staged as T into this warp's own 16 rows (wrow0..) of the 128B-swizzled tile
 * at stage. */
template <typename T, int DT, int BR>
__device__ __forceinline__ void normalize_stage_o(const FwdArgs &a, const float (&o)[1][DT][4], const float (&m_run)[1][2],
                                                  const float (&l_run)[1][2], const float (&t_run)[1][2], int64_t bh_row,
                                                  int q0, int wrow0, int lane, int n, unsigned char *stage) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float l = l_run[0][hf], t = t_run[0][hf];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        t += __shfl_xor_sync(0xffffffffu, t, 1);
        t += __shfl_xor_sync(0xffffffffu, t, 2);
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        const int rloc = wrow0 + (lane >> 2) + hf * 8;
        const int row = q0 + rloc;
        if ((lane & 3) == 0 && row < n) {
            if (a.lse) a.lse[bh_row + row] = (m_run[0][hf] + log2f(l)) * 0.69314718055994531f;
            if (a.text_mass) a.text_mass[bh_row + row] = t * inv;
        }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            const uint32_t v = pack2<T>(o[0][dt][hf * 2] * inv, o[0][dt][hf * 2 + 1] * inv);
            *reinterpret_cast<uint32_t *>(stage + sw128_offset<BR>(rloc, dt) + (lane & 3) * 4) = v;
        }
    }
}

/* A warp's per-row state at the start of a query tile: the logit multipliers of its rows q0 + wrow0 +
 * lane / 4 (+ 8) against text keys (mul_txt) and image keys (mul_vis), scale * log2(e) times gamma
 * where exactly one side is text, and zeroed O, running max, sum and text mass. */
template <int DT>
__device__ __forceinline__ void init_row_state(const FwdArgs &a, float g, int qb, int qe, int q0, int wrow0, int lane,
                                               float (&mul_txt)[1][2], float (&mul_vis)[1][2], float (&o)[1][DT][4],
                                               float (&m_run)[1][2], float (&l_run)[1][2], float (&t_run)[1][2]) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int row = q0 + wrow0 + (lane >> 2) + hf * 8;
        const bool rt = row >= qb && row < qe;
        mul_txt[0][hf] = a.scale_log2 * (rt ? 1.0f : g);
        mul_vis[0][hf] = a.scale_log2 * (rt ? a.gamma_reverse : 1.0f);
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[0][dt][e] = 0.0f;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        m_run[0][hf] = -INFINITY;
        l_run[0][hf] = 0.0f;
        t_run[0][hf] = 0.0f;
    }
}

template <typename T, typename C, bool FEAT>
__global__ void __launch_bounds__(C::THREADS, FEAT ? 1 : C::MINB) taca_fwd_sm90_kernel(const FwdArgs a) {
#if TACA_SM90A
    constexpr int DP = C::DP, BC = C::BC, BR = C::BR, NT = C::NT, DT = C::DT;
    constexpr int STAGES = C::STAGES;
    constexpr bool OVERLAP = C::OVERLAP;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sq = (raw + 1023u) & ~1023u;
    unsigned char *const smem = smem_raw + (sq - raw);  // generic pointer to the aligned base
    const uint32_t sk = sq + C::Q_BYTES;                // STAGES K buffers
    const uint32_t sv = sk + STAGES * C::KV_BYTES;      // STAGES V buffers

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
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

    // Prologue: group 0 = Q + K/V_0, groups 1 .. STAGES-1 = K/V_1 .. (possibly empty).
    // The first LOADERS threads issue every copy (keeps the row step a multiple of 8 rows, so
    // each thread's swizzle phase is fixed, for any number of warpgroups).
    constexpr int LOADERS = 256;
    const bool loader = tid < LOADERS;
    if (loader) load_tile_sw128<T, BR, DP, LOADERS>(sq, gq, a.qn, 0, n - q0, d, tid);
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
        if (loader && st < nkv) {
            load_tile_sw128<T, BC, DP, LOADERS>(sk + st * C::KV_BYTES, gk, a.kn, st * BC, nk, d, tid);
            load_tile_sw128<T, BC, DP, LOADERS>(sv + st * C::KV_BYTES, gv, a.vn, st * BC, nk, d, tid);
        }
        cp_async_commit();
    }

    const float g = a.gamma[b];
    const int wrow0 = wg * 64 + warp * 16;  // this warp's first row in the CTA tile
    float mul_txt[1][2], mul_vis[1][2], o[1][DT][4], m_run[1][2], l_run[1][2], t_run[1][2];
    init_row_state<DT>(a, g, sp.qb, sp.qe, q0, wrow0, lane, mul_txt, mul_vis, o, m_run, l_run, t_run);

    const uint32_t q_wg = sq + wg * 64 * 128;  // this warpgroup's 64 rows inside each column block
    // O += P V for one V buffer: BC/16 key steps x D/64 column blocks of m64n64k16, B N-major
    auto pv_product = [](float (&o_)[1][DT][4], const uint32_t (&p_)[BC / 16][4], uint32_t vbuf) {
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk)
#pragma unroll
            for (int hb = 0; hb < DP / 64; ++hb)
                wgmma_rs<T, 64, 1>(&o_[0][hb * 8][0], p_[kk], desc_sw128(vbuf + hb * BC * 128 + kk * 16 * 128), 1);
    };

    uint32_t pa[BC / 16][4];  // P of the previous tile while its P V product is in flight (OVERLAP)
    for (int j = 0; j < nkv; ++j) {
        const int k0 = j * BC;
        const int buf = j % STAGES;
        const uint32_t kb = sk + buf * C::KV_BYTES, vb = sv + buf * C::KV_BYTES;
        if constexpr (OVERLAP) cp_async_wait<STAGES - 2>();  // tile j is group j (see below)
        else cp_async_wait<STAGES - 1>();
        fence_proxy_async();
        __syncthreads();  // K_j, V_j (and Q) landed and are visible to wgmma

        float s[1][NT][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            const uint32_t koff = (kk & 3) * 32;  // 16 columns = 32 B inside a 128 B row
            wgmma_ss<T, BC, 0, 0>(&s[0][0][0], desc_sw128(q_wg + (kk >> 2) * BR * 128 + koff),
                                  desc_sw128(kb + (kk >> 2) * BC * 128 + koff), kk > 0);
        }
        wgmma_commit();
        if constexpr (OVERLAP) {
            // O += P_{j-1} V_{j-1} runs on the tensor cores while this warpgroup does the
            // softmax of S_j (which leaves O alone; O is rescaled once the product landed).
            if (j > 0) {
                const uint32_t vp = sv + ((j - 1) % STAGES) * C::KV_BYTES;
                fence_regs<DT * 4>(&o[0][0][0]);
                fence_regs<BC / 4>(&pa[0][0]);
                wgmma_fence();
                pv_product(o, pa, vp);
                wgmma_commit();
                wgmma_wait<1>();
            } else {
                wgmma_wait<0>();
            }
        } else {
            wgmma_wait<0>();
        }
        fence_regs<NT * 4>(&s[0][0][0]);

        const int k1 = k0 + BC;
        const int row0 = q0 + wrow0 + (lane >> 2);
        float alpha[1][2];
        const bool tmask = key_mask ? !keys_attend<BC>(a.mask, mbase, k0, nk, lane) : masked;
        if (!tmask && a.scale_log2 >= 0.0f && k1 <= nk && (k1 <= tb || k0 >= te))
            taca_fwd::softmax_tile<taca_fwd::TILE_VIS, !OVERLAP>(s, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb, te, lane, alpha,
                                                                 a.mask, mbase, row0, n);
        else if (!tmask && a.scale_log2 >= 0.0f && k1 <= nk && k0 >= tb && k1 <= te)
            taca_fwd::softmax_tile<taca_fwd::TILE_TXT, !OVERLAP>(s, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb, te, lane, alpha,
                                                                 a.mask, mbase, row0, n);
        else if (tmask)
            taca_fwd::softmax_tile<taca_fwd::TILE_MIXED, !OVERLAP, FEAT>(s, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb, te,
                                                                         lane, alpha, a.mask, mbase, row0, n);
        else
            taca_fwd::softmax_tile<taca_fwd::TILE_MIXED, !OVERLAP, false>(s, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb,
                                                                          te, lane, alpha, a.mask, mbase, row0, n);

        if constexpr (OVERLAP) {
            wgmma_wait<0>();  // P_{j-1} V_{j-1} landed: O and pa are free again
            fence_regs<DT * 4>(&o[0][0][0]);
            fence_regs<BC / 4>(&pa[0][0]);  // pa stays live (unreused) while the product reads it
            rescale_o<DT>(o, alpha);
        }
        pack_p<T, BC>(pa, s);

        if constexpr (OVERLAP) {
            // Tile j-1 is fully consumed: refill its buffer with tile j-1+STAGES. Group
            // accounting: the prologue committed tiles 0..STAGES-1 as groups 0..STAGES-1 and
            // iteration j >= 1 commits tile j-1+STAGES, so tile t is always group t.
            if (j > 0) {
                __syncthreads();  // every warpgroup is done with buffer (j-1) % STAGES
                const int t = j - 1 + STAGES;
                if (loader && t < nkv) {
                    const uint32_t off = (uint32_t)((j - 1) % STAGES) * C::KV_BYTES;
                    load_tile_sw128<T, BC, DP, LOADERS>(sk + off, gk, a.kn, t * BC, nk, d, tid);
                    load_tile_sw128<T, BC, DP, LOADERS>(sv + off, gv, a.vn, t * BC, nk, d, tid);
                }
                cp_async_commit();
            }
        } else {
            fence_regs<DT * 4>(&o[0][0][0]);
            wgmma_fence();
            pv_product(o, pa, vb);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs<DT * 4>(&o[0][0][0]);

            __syncthreads();  // every warpgroup is done with buffer `buf`
            if (loader && j + STAGES < nkv) {
                load_tile_sw128<T, BC, DP, LOADERS>(kb, gk, a.kn, k0 + STAGES * BC, nk, d, tid);
                load_tile_sw128<T, BC, DP, LOADERS>(vb, gv, a.vn, k0 + STAGES * BC, nk, d, tid);
            }
            cp_async_commit();  // possibly empty: one group per tile keeps wait_group<STAGES-1> exact
        }
    }
    if constexpr (OVERLAP) {  // the last tile's P V
        if (nkv > 0) {
            wgmma_fence();
            pv_product(o, pa, sv + ((nkv - 1) % STAGES) * C::KV_BYTES);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs<DT * 4>(&o[0][0][0]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: normalize, lse / text_mass, stage O (bf16/fp16) into this warp's own 16 rows of
    // the Q tile (same swizzle), then 16-byte row stores.
    fence_proxy_async();
    const int64_t bh_row = ((int64_t)b * gridDim.y + h) * n;
    normalize_stage_o<T, DT, BR>(a, o, m_run, l_run, t_run, bh_row, q0, wrow0, lane, n, smem);
    __syncwarp();
    T *go = static_cast<T *>(a.out) + b * a.ob + h * a.oh;
    constexpr int CPR = DP / 8;
    for (int i = lane; i < 16 * CPR; i += 32) {
        const int r = i / CPR, c = i % CPR;
        const int row = q0 + wrow0 + r;
        if (row < n && c * 8 < d)
            *reinterpret_cast<uint4 *>(go + (int64_t)row * a.on + c * 8) =
                *reinterpret_cast<const uint4 *>(smem + sw128_offset<BR>(wrow0 + r, c));
    }
#else
    (void)a;
#endif
}

template <typename T, typename C, bool FEAT = false>
int launch(const FwdArgs &a, int batch, int heads, cudaStream_t stream) {
    auto kernel = taca_fwd_sm90_kernel<T, C, FEAT>;
    // The kernel has a body only in an sm_90a binary: check which one this device runs.
    cudaFuncAttributes attr;
    TACA_CUDA_TRY(cudaFuncGetAttributes(&attr, kernel), "taca_fwd_cuda (sm90): cudaFuncGetAttributes");
    if (attr.binaryVersion != 90) return TACA_ERR_UNSUPPORTED;
    TACA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM),
                  "taca_fwd_cuda (sm90): cudaFuncSetAttribute");
    dim3 grid((a.n + C::BR - 1) / C::BR, heads, batch);
    kernel<<<grid, C::THREADS, C::SMEM, stream>>>(a);
    return taca_cuda_check_launch("taca_fwd_cuda (sm90): kernel launch");
}

}  // namespace taca_fwd90

#include "taca_fwd_sm90_ws.cuh"

namespace taca_fwd90 {

/* TACA_FWD_MASK, timing switches with the same outputs bitwise: "elem" takes a key mask by the per-element path
 * (MK_ANY) instead of per-tile terms; "tile" (D = 64) takes its per-tile terms in the two-consumer kernel (the default
 * before: the three-consumer one is 16-18% faster, SD3.5-M CFG with a key mask 0.665 -> 0.556 ms on an H100, KERNEL_LOG
 * 2026-12-05, twenty-sixth session); unset or "nc3": the default. */
[[maybe_unused]] static inline bool fwd_mask_mode(const char *mode) {
    const char *mk = getenv("TACA_FWD_MASK");
    return mk && !strcmp(mk, mode);
}

/* TACA_FWD_KT_ARRIVE=lane0: the key-mask instances whose barriers lane 0 of each warp arrives on after a __syncwarp
 * (the default before). The default (KTA, taca_fwd_sm90_ws.cuh) has every lane arrive: the same outputs bitwise, and
 * the one compute-sanitizer racecheck checks clean (it does not model __syncwarp: lane-0 arrivals drew 20 hazards on
 * the reused key-term slots under both consumer counts, every-lane ones none; no measurable cost, KERNEL_LOG
 * twenty-sixth session). */
[[maybe_unused]] static inline bool fwd_kt_arrive_lane0() {
    const char *ka = getenv("TACA_FWD_KT_ARRIVE");
    return ka && !strcmp(ka, "lane0");
}

/* The tail split (TACA_FWD_SPLIT, fwd_split_plan) of a call: the default D = 128 persistent kernel's items (WSplit;
 * its FEAT instances too: per-sample spans, and, opt-in, a key mask's per-tile terms with every-lane arrivals) on this
 * device's SMs; no plan (parts 0) for other variants, head dims other than 128 (launch_ws runs WSplit at 128 only),
 * masks that vary over queries, or the switches that take the per-element or lane-0 mask paths. The SM count query's
 * status (the dispatch and taca_fwd_sm90_split_bytes both take the plan from here, so the workspace sized is the one
 * used). */
using WSplit = WsCfg<2, false, true, 128, true>;
// WSplit with FA3's intra-warpgroup overlap (softmax of S_j while P_{j-1} V_{j-1} runs; O rescaled once it landed):
// the same fp32 operations in the same order (bitwise-equal outputs), measured per key count (fwd_overlap)
using WSplitOv = WsCfg<2, true, true, 128, true>;
/* The D = 128 default's intra-warpgroup overlap (WSplitOv) or not (WSplit): TACA_FWD_OVERLAP=0 / 1 forces one (a
 * timing switch); otherwise overlap at every key count (up to 15360 before PVW), and not with a key mask (its instances, MK_KEY with every
 * consumer thread arriving, take it only when forced: not yet timed). H100, forward ms without / with it (KERNEL_LOG twenty-ninth
 * session): FLUX 512 (1536 keys) even; FLUX 1024 (4608) -2.7..-3.8% isolated, -1.9..-2.2% sustained; FLUX 1536 (9728)
 * -6% isolated, -2.5% sustained; FLUX 2048 (16896) even isolated (noisy), +0.2% / +1.6% sustained on two machines.
 * H200, sustained (thirty-first session): 13056 keys -2.1%, 14912 -3.0%, 16896 +1.4%; isolated noisy either way.
 * With PVW the default (forty-fourth session, H100, one mode per process, 3 rounds, two calls): FLUX 2048 -4.1% and
 * -3.6%; with a key mask +4.8% (so the mask keeps it opt-in). */
[[maybe_unused]] static inline bool fwd_overlap(const FwdArgs &a) {
    if (const char *e = getenv("TACA_FWD_OVERLAP")) return strcmp(e, "0") != 0;
    return !a.mask.data;
}
// WsCfg's FORM for the D = 128 default without spans or a mask: PVW (P V as m64n128k16 wgmmas, bitwise the m64n64k16
// form; the default, TACA_FWD_PVW=0 the m64n64k16 form) and timing switches, off by default: TACA_FWD_LZ=1 adds IL and
// LZ (the lazy running max), with PVW or not; TACA_FWD_TURN=1 adds TURN (the consumers' turn across items, bitwise the
// same outputs) to the PVW form without LZ (the tail split's instance too), and to D = 64's plain default (fwd_turn).
// IL alone (TACA_FWD_IL=1 in the fortieth session) was slower at FLUX 1024 and with PVW at 2048 (H200, KERNEL_LOG
// forty-first session), TX (TACA_FWD_TX=1: the consumers' turn around the exponentials) 3.5-9% slower everywhere (H100,
// forty-third session): neither is built now
template <int F> using WSplitF = WsCfg<2, false, true, 128, true, 128, 2, F>;
template <int F> using WSplitOvF = WsCfg<2, true, true, 128, true, 128, 2, F>;
[[maybe_unused]] static inline bool fwd_pvw() {
    const char *p = getenv("TACA_FWD_PVW");
    return !(p && !strcmp(p, "0"));
}
[[maybe_unused]] static inline bool fwd_turn() {
    const char *t = getenv("TACA_FWD_TURN");
    return t && !strcmp(t, "1");
}
[[maybe_unused]] static inline int fwd_form() {
    const char *z = getenv("TACA_FWD_LZ");
    const int f = (fwd_pvw() ? 1 : 0) | (z && !strcmp(z, "1") ? 6 : 0);
    return f == 1 && fwd_turn() ? 9 : f;  // TURN: built with PVW alone
}
// run(std::integral_constant<int, F>()) with F = 1 (PVW) at D = 128 unless TACA_FWD_PVW=0 (fwd_pvw), else 0: the form
// of the instances with spans or a mask (IL and LZ are the plain default's only)
template <int D, typename R>
static inline int by_pvw(R &&run) {
    if constexpr (D == 128)
        if (fwd_pvw()) return run(std::integral_constant<int, 1>());
    return run(std::integral_constant<int, 0>());
}
// run(std::integral_constant<int, F>()) for the call's form F (fwd_form)
template <typename R>
static inline int by_form(R &&run) {
    switch (fwd_form()) {
    case 1: return run(std::integral_constant<int, 1>());
    case 6: return run(std::integral_constant<int, 6>());
    case 7: return run(std::integral_constant<int, 7>());
    case 9: return run(std::integral_constant<int, 9>());
    default: return run(std::integral_constant<int, 0>());
    }
}
[[maybe_unused]] static inline bool d128_split_mask_ok(const FwdArgs &a) {
    return !a.mask.data || (a.mask.q == 0 && !fwd_mask_mode("elem") && !fwd_kt_arrive_lane0());
}
[[maybe_unused]] static inline int d128_split_plan(const FwdArgs &a, int variant, int batch, int heads, SplitPlan *sp) {
    *sp = SplitPlan{};
    if ((variant != 0 && variant != 10) || !ws_head_dim_ok<WSplit::DP>(a.d) || !d128_split_mask_ok(a))
        return TACA_OK;
    int sms = 0;
    const int st = device_sm_count(&sms, "taca_fwd_cuda (sm90 ws): SM count");
    if (st != TACA_OK) return st;
    // a key mask's instances split only when TACA_FWD_SPLIT is set: on an H100 their range form was 2-5% slower than
    // unsplit at FLUX 1024's item counts (its registers spill: 76 / 116 bytes), where per-sample spans' was 0.3-2.7%
    // faster, as the plain instance's (KERNEL_LOG twenty-seventh session)
    *sp = fwd_split_plan<WSplit::DP>((int64_t)((a.n + WSplit::BR - 1) / WSplit::BR) * heads * batch, sms,
                                     (a.nk + WSplit::BC - 1) / WSplit::BC, !a.mask.data);
    return TACA_OK;
}

/* The tail split of the D = 128 persistent instance <FEAT, MK, KTA> (TACA_ERR_UNSUPPORTED when none ran: no plan, a
 * workspace too small, a map refused; the caller then launches the unsplit kernel, which would refuse the same maps).
 * The two-launch form (TACA_FWD_SPLIT_FORM=two): the whole items by the unsplit instance first, then the ranges. */
template <typename T, bool FEAT, int MK, bool KTA, typename WS = WSplit>
int launch_split(const FwdArgs &a, int variant, int batch, int heads, cudaStream_t stream, void *ws, size_t ws_bytes) {
    if (!ws) return TACA_ERR_UNSUPPORTED;
    SplitPlan sp;
    const int sst = d128_split_plan(a, variant, batch, heads, &sp);
    if (sst != TACA_OK) return sst;
    if (sp.parts < 2 || ws_bytes < sp.bytes) return TACA_ERR_UNSUPPORTED;
    if (sp.two) {
        const int st1 = launch_ws<T, WS, FEAT, MK, KTA>(a, batch, heads, stream, nullptr, nullptr, sp.first);
        if (st1 != TACA_OK) return st1;
    }
    return launch_ws<T, WS, FEAT, MK, KTA, true>(a, batch, heads, stream, &sp, ws);
}

/* D = 64 default: the key tile (128, 160 or 192 keys) with the least work by a tile count model, keys rounded up to
 * whole tiles plus a per-tile cost of 27 keys' worth: fitted on the H200 at SD3.5-M CFG 1536 x 1536 (9549 keys; the
 * three tile sizes cover the same 9600 keys there; 192-key tiles 5.7% and 160-key ones 2.5% faster than 128-key
 * ones, KERNEL_LOG seventeenth session). It also ranks SD3.5 CFG at 1024 x 1024 (4429 keys) as measured: 160 best
 * (-1.0% / -1.5% against 128), 192 +0.4..1.0%. Ties keep the smaller tile. Returns the tile's key count. */
[[maybe_unused]] static inline int d64_key_tile(int nk) {
    int best = 128;
    int64_t cost = (int64_t)((nk + 127) / 128) * (128 + 27);
    for (int bc : {160, 192}) {
        const int64_t c = (int64_t)((nk + bc - 1) / bc) * (bc + 27);
        if (c < cost) cost = c, best = bc;
    }
    return best;
}

/* variant 0 is the default; the others are alternatives kept selectable for the benchmark
 * (taca_fwd_cuda_variant). D = 128: 0 (= 10): warp-specialized (taca_fwd_sm90_ws.cuh: TMA
 * producer warpgroup, two consumer warpgroups taking turns, 128-key tiles, 2 stages);
 * 11: the same with the softmax of tile j overlapping P V of tile j-1 inside each warpgroup;
 * 12: warp-specialized without the turns; 10..12 fall back to 13 where a TMA map cannot be
 * encoded. 13: this file's kernel (the default before), 128-key tiles, 2 stages; 7: 13 with
 * the P V product of tile j-1 overlapping the softmax of tile j (3 stages); 8: overlap, 64-key
 * tiles, 4 stages; 9: no overlap, 128-key tiles, 3 stages. D = 64: 0 (= 10): warp-specialized
 * (taca_fwd_sm90_ws.cuh at DP = 64: 128-row CTAs, 128-key tiles, 2 stages; 0.640 vs 0.671 ms on
 * SD3.5-M cfg, H200, KERNEL_LOG), 11: that with the intra-warpgroup overlap, 12: that with 4
 * stages (10..12 fall back to 13 where a TMA map cannot be encoded); 13: this file's kernel,
 * 64-key tiles, 3 stages (the default before); 7: overlap, 64-key tiles, 4 stages; 8: overlap,
 * 128-key tiles, 3 stages; 9: overlap, 3 warpgroups (192-row CTAs), 64-key tiles, 4 stages.
 * D = 128's default takes 11's intra-warpgroup overlap in its persistent form (fwd_overlap).
 * Both D: the default (0 = 10 at D = 128; 0 = 17 at D = 64; the FEAT instance) is the
 * warp-specialized kernel PERSISTENT
 * (one CTA per SM over the (query tile, head, batch) items, two Q buffers: the next item's loads
 * overlap this one's last products and epilogue); 14 is it with one CTA per item (the default
 * before). Wider key tiles (WsCfg's BC): D = 128, 15: the default with 160-key tiles (shared memory
 * allows no more with two Q buffers), 16: 192-key tiles, one CTA per item; D = 64, 15 / 16: the
 * default with 192- / 160-key tiles (256 keys made ptxas serialize the wgmmas for registers); 18: 10, 15 or 16 by
 * d64_key_tile (the default before); 17 (= 0): the persistent kernel with three consumer warpgroups (192-row CTAs,
 * 128-key tiles; SD3.5-M / L CFG 0.536 / 0.812 ms against 18's 0.614 / 0.977 on an H200, KERNEL_LOG). Three consumer
 * warpgroups at D = 128 (64-key tiles: 128-key ones need more than 160 registers) ran 6-12% slower than 0 at the FLUX
 * shapes and were removed (KERNEL_LOG 2026-12-05). */
template <typename T, int D>
int dispatch_d(const FwdArgs &a, int variant, int batch, int heads, cudaStream_t stream, void *ws = nullptr,
               size_t ws_bytes = 0) {
    if (a.spans || a.mask.data) {  // per-sample spans or a mask: the default tiling's FEAT instance
        // the mask code only where there is a mask; a key mask as per-tile terms (MK_*, taca_fwd_sm90_ws.cuh)
        // D = 64: three consumer warpgroups (192-row CTAs) as the default below, a key mask's terms too (MK_KEY at three
        // spills 48 bytes and runs 16-18% faster than at two, TACA_FWD_MASK=tile; MK_ANY at three spills 156: two)
        // D = 128: PVW unless TACA_FWD_PVW=0 (by_pvw), as the plain default's
        const int st = by_pvw<D>([&](auto f) {
            constexpr int F = decltype(f)::value;
            using W = WsCfg<2, false, true, D, true, 128, 2, F>;
            using W3 = std::conditional_t<D == 64, WsCfg<2, false, true, 64, true, 128, 3>, W>;
            using W14 = WsCfg<2, false, true, D>;
            if constexpr (D == 128) {  // the tail split (d128_split_plan): spans, or a key mask's terms (KTA)
                if (variant != 14 && d128_split_mask_ok(a)) {
                    // the overlap by fwd_overlap: spans as the plain default, a key mask only when forced
                    const bool ov = fwd_overlap(a);
                    const int sst = a.mask.data
                                        ? (ov ? launch_split<T, true, MK_KEY, true, WSplitOvF<F>>(a, variant, batch, heads, stream, ws, ws_bytes)
                                              : launch_split<T, true, MK_KEY, true, WSplitF<F>>(a, variant, batch, heads, stream, ws, ws_bytes))
                                        : ov ? launch_split<T, true, MK_NONE, false, WSplitOvF<F>>(a, variant, batch, heads, stream, ws, ws_bytes)
                                             : launch_split<T, true, MK_NONE, false, WSplitF<F>>(a, variant, batch, heads, stream, ws, ws_bytes);
                    if (sst != TACA_ERR_UNSUPPORTED) return sst;
                }
            }
            return variant == 14 ? (a.mask.data ? launch_ws<T, W14, true, MK_ANY>(a, batch, heads, stream)
                                                : launch_ws<T, W14, true, MK_NONE>(a, batch, heads, stream))
                   : !a.mask.data ? (D == 128 && fwd_overlap(a) ? launch_ws<T, WSplitOvF<F>, true, MK_NONE>(a, batch, heads, stream)
                                                                : launch_ws<T, W3, true, MK_NONE>(a, batch, heads, stream))
                   : fwd_mask_mode("elem") || a.mask.q != 0 ? launch_ws<T, W, true, MK_ANY>(a, batch, heads, stream)
                   : D == 64 && !fwd_mask_mode("tile")
                       ? (fwd_kt_arrive_lane0() ? launch_ws<T, W3, true, MK_KEY>(a, batch, heads, stream)
                                                : launch_ws<T, W3, true, MK_KEY, true>(a, batch, heads, stream))
                   : fwd_kt_arrive_lane0() ? launch_ws<T, W, true, MK_KEY>(a, batch, heads, stream)
                   : D == 128 && fwd_overlap(a) ? launch_ws<T, WSplitOvF<F>, true, MK_KEY, true>(a, batch, heads, stream)
                                                : launch_ws<T, W, true, MK_KEY, true>(a, batch, heads, stream);
        });
        if (st != TACA_ERR_UNSUPPORTED) return st;
        // no TMA map: this file's kernel (variant 13's tiling)
        using V13 = std::conditional_t<D == 128, Cfg<128, 128, 2, 2, false>, Cfg<64, 64, 2, 3, false>>;
        return taca_fwd90::launch<T, V13, true>(a, batch, heads, stream);
    }
    if constexpr (D == 128) {
        switch (variant) {
        case 7: return launch<T, Cfg<128, 128, 2, 3, true>>(a, batch, heads, stream);
        case 8: return launch<T, Cfg<128, 64, 2, 4, true>>(a, batch, heads, stream);
        case 9: return launch<T, Cfg<128, 128, 2, 3, false>>(a, batch, heads, stream);
        case 13: return launch<T, Cfg<128, 128, 2, 2, false>>(a, batch, heads, stream);
        default: {
            // the tail split (fwd_split_plan; TACA_FWD_SPLIT=0: none): the partial wave's items in key ranges
            const bool ov = fwd_overlap(a);
            const int sst = by_form([&](auto f) {
                constexpr int F = decltype(f)::value;
                return ov ? launch_split<T, false, MK_NONE, false, WSplitOvF<F>>(a, variant, batch, heads, stream, ws, ws_bytes)
                          : launch_split<T, false, MK_NONE, false, WSplitF<F>>(a, variant, batch, heads, stream, ws, ws_bytes);
            });
            if (sst != TACA_ERR_UNSUPPORTED) return sst;
            const int st = variant == 11   ? launch_ws<T, WsCfg<2, true, true>>(a, batch, heads, stream)
                           : variant == 12 ? launch_ws<T, WsCfg<2, false, false>>(a, batch, heads, stream)
                           : variant == 14 ? launch_ws<T, WsCfg<2, false, true>>(a, batch, heads, stream)
                           : variant == 15 ? launch_ws<T, WsCfg<2, false, true, 128, true, 160>>(a, batch, heads, stream)
                           : variant == 16 ? launch_ws<T, WsCfg<2, false, true, 128, false, 192>>(a, batch, heads, stream)
                           : by_form([&](auto f) {
                                 constexpr int F = decltype(f)::value;
                                 return ov ? launch_ws<T, WSplitOvF<F>>(a, batch, heads, stream)
                                           : launch_ws<T, WSplitF<F>>(a, batch, heads, stream);
                             });
            if (st != TACA_ERR_UNSUPPORTED) return st;
            return launch<T, Cfg<128, 128, 2, 2, false>>(a, batch, heads, stream);  // no TMA map
        }
        }
    } else {
        switch (variant) {
        case 7: return launch<T, Cfg<64, 64, 2, 4, true>>(a, batch, heads, stream);
        case 8: return launch<T, Cfg<64, 128, 2, 3, true>>(a, batch, heads, stream);
        case 9: return launch<T, Cfg<64, 64, 3, 4, true>>(a, batch, heads, stream);
        case 13: return launch<T, Cfg<64, 64, 2, 3, false>>(a, batch, heads, stream);
        default: {
            // two consumer warpgroups: 18 picks the key tile by key count (the default before), 15 / 16: 192 / 160
            // keys, 10: 128; 0 = 17: three consumer warpgroups, 128-key tiles
            const int bc = variant == 18 ? d64_key_tile(a.nk) : variant == 15 ? 192 : variant == 16 ? 160 : 128;
            const int st = variant == 11   ? launch_ws<T, WsCfg<2, true, true, 64>>(a, batch, heads, stream)
                           : variant == 12 ? launch_ws<T, WsCfg<4, false, true, 64>>(a, batch, heads, stream)
                           : (variant == 0 || variant == 17) && fwd_turn()
                               ? launch_ws<T, WsCfg<2, false, true, 64, true, 128, 3, 8>>(a, batch, heads, stream)
                           : variant == 0 || variant == 17
                               ? launch_ws<T, WsCfg<2, false, true, 64, true, 128, 3>>(a, batch, heads, stream)
                           : variant == 14 ? launch_ws<T, WsCfg<2, false, true, 64>>(a, batch, heads, stream)
                           : bc == 192     ? launch_ws<T, WsCfg<2, false, true, 64, true, 192>>(a, batch, heads, stream)
                           : bc == 160     ? launch_ws<T, WsCfg<2, false, true, 64, true, 160>>(a, batch, heads, stream)
                                           : launch_ws<T, WsCfg<2, false, true, 64, true>>(a, batch, heads, stream);
            if (st != TACA_ERR_UNSUPPORTED) return st;
            return launch<T, Cfg<64, 64, 2, 3, false>>(a, batch, heads, stream);  // no TMA map
        }
        }
    }
}

/* The warp-specialized kernel at D = 256 (WS256): two consumer warpgroups of 64 rows, 64-key tiles, two stages, one CTA
 * per item (two Q buffers do not fit beside the stages): Q 64 KiB + K / V 128 KiB; O is 128 fp32 registers a consumer
 * thread. Its FEAT instances take per-sample spans (MK_NONE), a key mask's per-tile terms (MK_KEY, KTA) and any other
 * mask (MK_ANY), as D = 128's do. Where it runs: fwd_d256_ws. */
using W256 = WsCfg<2, false, true, 256, false, 64>;

/* TACA_FWD_D256=ws / cp (a timing switch, read at every call): the warp-specialized kernel or this file's cp.async
 * kernel at D = 200..256 for variant 0; variant 10 is the warp-specialized one, the others the cp.async ones. Default:
 * cp.async until compute-sanitizer has run the warp-specialized one (tested and 1.5x faster on an H100 in the fiftieth
 * session: KERNEL_LOG). */
[[maybe_unused]] static inline bool fwd_d256_ws(int variant) {
    if (variant == 10) return true;
    if (variant != 0) return false;
    const char *e = getenv("TACA_FWD_D256");
    return e && !strcmp(e, "ws");
}

/* D = 256 (AuraFlow, Ideogram 4; aligned 200..256 zero-filled): W256 (fwd_d256_ws), else this file's kernel with two
 * warpgroups (128-row CTAs) and 64-key tiles, 2 stages: Q 64 KiB + K/V 128 KiB of shared memory, O 128 fp32
 * registers per thread. 7: P V of tile j-1 overlapping the softmax of tile j. Variants 1..6 force the mma.sync
 * kernel (taca_fwd.cu). */
template <typename T>
int dispatch_d256(const FwdArgs &a, int variant, int batch, int heads, cudaStream_t stream) {
    if (fwd_d256_ws(variant)) {
        const int st = !a.spans && !a.mask.data ? launch_ws<T, W256>(a, batch, heads, stream)
                       : !a.mask.data           ? launch_ws<T, W256, true, MK_NONE>(a, batch, heads, stream)
                       : fwd_mask_mode("elem") || a.mask.q != 0 || fwd_kt_arrive_lane0()
                           ? launch_ws<T, W256, true, MK_ANY>(a, batch, heads, stream)
                           : launch_ws<T, W256, true, MK_KEY, true>(a, batch, heads, stream);
        if (st != TACA_ERR_UNSUPPORTED) return st;
    }
    if (a.spans || a.mask.data) return taca_fwd90::launch<T, Cfg<256, 64, 2, 2, false>, true>(a, batch, heads, stream);
    if (variant == 7) return launch<T, Cfg<256, 64, 2, 2, true>>(a, batch, heads, stream);
    return launch<T, Cfg<256, 64, 2, 2, false>>(a, batch, heads, stream);
}

template <typename T>
int dispatch_t(const FwdArgs &a, int variant, int batch, int heads, cudaStream_t stream, void *ws, size_t ws_bytes) {
    if (a.d > 128) return dispatch_d256<T>(a, variant, batch, heads, stream);
    return a.d == 64 ? dispatch_d<T, 64>(a, variant, batch, heads, stream)
                     : dispatch_d<T, 128>(a, variant, batch, heads, stream, ws, ws_bytes);
}

/* dispatch_t<__half>: defined in taca_fwd_sm90_f16.cu, which compiles this file a second time with
 * TACA_FWD90_HALF_PART, so the __half kernels are a translation unit of their own and build in parallel with the
 * bf16 ones (one file held every instance: the longest compile of the build, ~3 min on one core) */
int dispatch_half(const FwdArgs &a, int variant, int batch, int heads, cudaStream_t stream, void *ws, size_t ws_bytes);

}  // namespace taca_fwd90

#if defined(TACA_FWD90_HALF_PART)
#if defined(TACA_HAVE_SM90A)
int taca_fwd90::dispatch_half(const FwdArgs &a, int variant, int batch, int heads, cudaStream_t stream, void *ws,
                              size_t ws_bytes) {
    return dispatch_t<__half>(a, variant, batch, heads, stream, ws, ws_bytes);
}
#endif
#else  // the bf16 part: the entry points, the bf16 kernels and the FP8 forward

#include "taca_fwd_sm90_fp8.cuh"

/* The FP8 forward (taca_fwd_fp8_cuda): TACA_ERR_UNSUPPORTED where it cannot run (no sm_90a build or device, or a
 * TMA map the driver refuses). The caller checked D = 128, alignment, no spans or mask. */
int taca_fwd_fp8_sm90(const taca_fwd::FwdArgs &a, int dtype, int variant, int batch, int heads, void *workspace,
                      cudaStream_t stream) {
#if defined(TACA_HAVE_SM90A)
    const int dev_st = taca_sm90::device_is_sm90("taca_fwd_fp8_cuda: device query");
    if (dev_st != TACA_OK) return dev_st;
    if (dtype == TACA_BF16) return taca_fwd90::launch_fp8<__nv_bfloat16>(a, variant, batch, heads, workspace, stream);
    return taca_fwd90::launch_fp8<__half>(a, variant, batch, heads, workspace, stream);
#else
    (void)a; (void)dtype; (void)variant; (void)batch; (void)heads; (void)workspace; (void)stream;
    return TACA_ERR_UNSUPPORTED;
#endif
}

/* TACA_ERR_UNSUPPORTED when this path does not apply (the caller then takes mma.sync). ws: the tail split's
 * workspace (taca_fwd_sm90_split_bytes), or NULL. */
int taca_fwd_sm90(const taca_fwd::FwdArgs &a, int dtype, int variant, int batch, int heads,
                  cudaStream_t stream, void *ws, size_t ws_bytes) {
#if defined(TACA_HAVE_SM90A)
    // aligned (d % 8 == 0): 64, 72..128 (zero-filled to 128), 200..256 (zero-filled to 256)
    if (a.d != 64 && (a.d < 72 || a.d > 128) && (a.d < 200 || a.d > 256)) return TACA_ERR_UNSUPPORTED;
    const int dev_st = taca_sm90::device_is_sm90("taca_fwd_cuda (sm90): device query");
    if (dev_st != TACA_OK) return dev_st;
    if (dtype == TACA_BF16) return taca_fwd90::dispatch_t<__nv_bfloat16>(a, variant, batch, heads, stream, ws, ws_bytes);
    return taca_fwd90::dispatch_half(a, variant, batch, heads, stream, ws, ws_bytes);
#else
    (void)a; (void)dtype; (void)variant; (void)batch; (void)heads; (void)stream; (void)ws; (void)ws_bytes;
    return TACA_ERR_UNSUPPORTED;
#endif
}

/* The workspace the tail split takes for this call (0: none, no split: TACA_FWD_SPLIT=0, not the D = 128 default
 * kernel's case, no partial wave, or one the plan leaves whole). The caller checked the parameters and the alignment. */
size_t taca_fwd_sm90_split_bytes(const taca_fwd::FwdArgs &a, int variant, int batch, int heads) {
#if defined(TACA_HAVE_SM90A)
    if (taca_sm90::device_is_sm90("taca_fwd_cuda (sm90): device query") != TACA_OK) return 0;
    taca_fwd90::SplitPlan sp;
    if (taca_fwd90::d128_split_plan(a, variant, batch, heads, &sp) != TACA_OK) return 0;
    return sp.bytes;
#else
    (void)a; (void)variant; (void)batch; (void)heads;
    return 0;
#endif
}
#endif  // TACA_FWD90_HALF_PART
