/*
 * taca_bwd_sm90.cu: Hopper (sm_90a) main backward kernel of gamma-scaled joint attention with
 * wgmma, for aligned inputs (vec_load) with D = 64 or 72..128 (zero-filled to 128 columns, as the
 * workspace's DP) on a compute capability 9.0 device
 * when this file was built for sm_90a (setup.py defines TACA_HAVE_SM90A then). Everything else,
 * and TACA_BWD_SM90=0 in the environment (a test / benchmarking switch read by taca_bwd.cu),
 * takes the mma.sync kernel (taca_bwd_kernel.cuh). Math, workspace, preprocess, the ordered dQ
 * chains and bwd_dq_convert are the mma.sync path's (taca_bwd.cu explains them); only bwd_main
 * is replaced.
 *
 * Spans, masks, N_q != N_k and grouped KV heads as in bwd_main (taca_bwd.cu): a CTA owns one
 * key/value head and walks the flattened (query head of its group, query tile) sequence; the
 * dQ writer warpgroup follows the same sequence. The mask is a template flag.
 *
 * CTA = 3 warpgroups (384 threads) per (128-key tile, key/value head, batch): two MMA warpgroups
 * (setmaxnreg 240 registers) and one dQ writer warpgroup (24 registers). MMA warpgroup w owns
 * keys [64w, 64w + 64). K and V (128 x D) stay in shared memory, Q and dO tiles of BM queries stream
 * through a cp.async double buffer (BM = 64 for D = 128, 128 for D = 64), all in the 128-byte
 * swizzled layout of taca_sm90.cuh. Per query tile, per warpgroup (accumulators fp32):
 *   S^T  (64 keys x BM) = K_w Q^T     wgmma SS, A = K rows, B = Q rows (both K-major)
 *   dP^T (64 keys x BM) = V_w dO^T    same with V, dO (second commit group: P is computed
 *                                     while it runs)
 *   P^T = exp2(S^T scale log2e m + log2e mask - lse2), dS'^T = m P^T (dP^T - delta)
 *   dV_w += P^T dO,  dK_w += dS'^T Q  wgmma RS (A = P^T / dS'^T packed from the accumulators,
 *                                     B = dO / Q N-major: the forward's O += P V pattern)
 *   dS' (BM x 128 keys) -> smem       stmatrix .trans of the dS'^T fragments (K-major tile)
 *   dQ part = dS' K                   wgmma SS, A = dS' (K-major), B = K (N-major, keys = K dim);
 *                                     D = 128: warpgroup w makes dQ columns [64w, 64w + 64);
 *                                     D = 64: warpgroup w makes dQ rows [64w, 64w + 64)
 * The dQ part (fp32) goes to one of two shared-memory staging buffers; the writer warpgroup
 * adds it to the chain's float32 buffer with the ordering protocol of bwd_main (wait until the
 * predecessor key tile released this query tile, a TMA bulk reduce-add (or red.add.v4) or the
 * chain's first store, fence, release), so the global reductions and chain waits leave the MMA
 * warpgroups' critical path.
 * Staging hand-off (TACA_BWD_SM90_HANDOFF, a test / timing knob read at every call):
 *   "mbarrier" (the default until 2026-12-03): full[b] / empty[b] mbarriers in shared memory for staging buffer b.
 *     Every MMA thread arrives on full[b] (release) after its staging writes; the writer waits
 *     on it (try_wait.parity, acquire), reads, and every writer thread arrives on empty[b], which
 *     the MMA threads wait on before writing tile it + 2 into b. The writer may lag two tiles.
 *     It releases tile it - 1 to the chain's successor after its wait for tile it (a 128-thread
 *     named barrier first, so that every writer thread has issued its adds).
 *   "mbarrier-eager": the same, releasing each tile right after issuing its adds.
 *   "rendezvous" (v4c, commit 2a04964): both sides bar.sync the named barrier FULL + (tile & 1)
 *     with all 384 threads; the writer releases tile it - 1 right after the rendezvous of tile it.
 *   "arrive" (v4b): the MMA warpgroups bar.arrive FULL and bar.sync EMPTY, the writer bar.sync
 *     FULL and bar.arrive EMPTY, releasing each tile right after issuing its adds.
 *   "none": no writer warpgroup (256 threads, commit bc8237e, v4a): the MMA warpgroups wait for
 *     the chain and add their dQ part to global memory themselves.
 *   "bulk" (default since 2026-12-03): the mbarrier hand-off (late release), the writer adding
 *     each staged row with one TMA bulk reduce-add (cp.reduce.async.bulk .add.f32, shared ->
 *     global; the chain's first tile a bulk copy) instead of 16-byte red.add per thread: it waits
 *     for the bulk reads before freeing the staging buffer and for the bulk writes (plus a proxy
 *     fence) before each release. Bwd alone on an H200: 1.803 vs 1.934 ms (FLUX b1), 1.849 vs
 *     1.930 (SD3.5-M cfg), bitwise-equal gradients (KERNEL_LOG, "dQ by TMA bulk reduce-add").
 * All six add the same values in the same chain order (bitwise-equal gradients, tested).
 * compute-sanitizer racecheck (CUDA 13.0, H100, KERNEL_LOG "Backward v5"): 0 hazards for the
 * mbarrier hand-off and "none"; "rendezvous" and "arrive" report hazards between the writer's
 * staging read and the MMA warps' staging write (the named-barrier hand-offs; the reason is
 * discussed there), so they stay opt-in.
 * Registers per MMA thread: dV + dK accumulators D (64 + 64 at D = 128), S^T + dP^T BM/2 each.
 * Measured speeds: benchmarks/results/KERNEL_LOG.md, "Backward v4 (Hopper)" and "Backward v5".
 */
#include <stdlib.h>
#include <string.h>

#include "taca_bwd_kernel.cuh"
#include "taca_bwd_sm90.cuh"
#include "taca_sm90.cuh"

namespace taca_bwd90 {

using namespace taca_cuda;
using namespace taca_sm90;
using namespace taca_wgmma;
using taca_bwd::BwdArgs;

template <int DP_, bool WRITER_ = true>
struct Cfg {
    static constexpr int DP = DP_;
    static constexpr bool WRITER = WRITER_;
    static constexpr int BN = 128;                 // keys per CTA
    static constexpr int BM = DP == 64 ? 128 : 64;  // queries per tile (= config_for's bm)
    static constexpr int THREADS = WRITER ? 384 : 256;  // 2 MMA warpgroups (+ the dQ writer)
    static constexpr uint32_t KV_BYTES = BN * DP * 2;
    static constexpr uint32_t QT_BYTES = BM * DP * 2;  // one Q or one dO buffer
    static constexpr uint32_t DS_BYTES = BM * BN * 2;
    static constexpr uint32_t SROW = DP * 4 + 16;        // dQ staging row (fp32, padded 16 B)
    static constexpr uint32_t STAGE_BYTES = BM * SROW;  // one of the two dQ staging buffers
    static constexpr size_t SMEM = 2 * KV_BYTES + 4 * QT_BYTES + DS_BYTES + 4 * BM * sizeof(float) +
                                   (WRITER ? 2 * STAGE_BYTES + 4 * sizeof(uint64_t) : 0) + 1024;
    static_assert(DP == 64 || DP == 128, "head dim");
};

/* Hand-off modes (TACA_BWD_SM90_HANDOFF); kNone is the 256-thread kernel without a writer. */
enum Handoff { kMbarrier = 0, kMbarrierEager = 1, kRendezvous = 2, kArrive = 3, kNone = 4, kBulk = 5 };

/* Named barriers (0 is unused with a writer: the writer warpgroup never joins the MMA threads'
 * syncs). FULL + b / EMPTY + b belong to staging buffer b. */
enum { BAR_MMA = 1, BAR_FULL = 2, BAR_EMPTY = 4, BAR_WRITER = 6 };
__device__ __forceinline__ void bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
/* mbarrier (8 bytes of shared memory at address bar): init, arrive (release, CTA scope) and a
 * spin on try_wait.parity (acquire, CTA scope) until the phase of that parity has completed. */
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if TACA_SM90A
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
    (void)bar; (void)count;
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if TACA_SM90A
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
    (void)bar;
#endif
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
#if TACA_SM90A
    uint32_t done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
#else
    (void)bar; (void)parity;
#endif
}
/* p[0..3] += v as one fire-and-forget reduction (16-byte aligned p). */
__device__ __forceinline__ void red_add4(float *p, float4 v) {
#if TACA_SM90A
    asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(v.x), "f"(v.y),
                 "f"(v.z), "f"(v.w)
                 : "memory");
#else
    (void)p; (void)v;
#endif
}

/* MASK: a.mask.data != NULL (its own instance: the unmasked one carries no mask code). */
template <typename T, int DP, bool WRITER, bool MASK>
__global__ void __launch_bounds__(Cfg<DP, WRITER>::THREADS, 1)
    taca_bwd_sm90_kernel(const BwdArgs a, const int ho) {
#if TACA_SM90A
    using C = Cfg<DP, WRITER>;
    constexpr int BM = C::BM, BN = C::BN, NT = BM / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sk = (raw + 1023u) & ~1023u;
    unsigned char *const smem = smem_raw + (sk - raw);  // generic pointer to the aligned base
    const uint32_t sv = sk + C::KV_BYTES;
    const uint32_t sq = sv + C::KV_BYTES;        // [2] Q tiles
    const uint32_t sdo = sq + 2 * C::QT_BYTES;   // [2] dO tiles
    const uint32_t sds = sdo + 2 * C::QT_BYTES;  // dS' (BM x 128 keys), K-major
    float *const sL = reinterpret_cast<float *>(smem + (sds + C::DS_BYTES - sk));  // [2][BM] lse2
    float *const sDl = sL + 2 * BM;                                                  // [2][BM] delta
    unsigned char *const stage = reinterpret_cast<unsigned char *>(sDl + 2 * BM);   // [2] dQ staging
    const uint32_t mb_full = smem_u32(stage + 2 * C::STAGE_BYTES);  // [2] mbarriers, then
    const uint32_t mb_empty = mb_full + 16;                          // [2] (8 bytes each)
    const bool rdv = ho == kRendezvous;
    const bool bulk = ho == kBulk;
    const bool mbar = ho == kMbarrier || ho == kMbarrierEager || bulk;
    // Release of a finished query tile to the chain's successor: "late" = one tile later, after
    // the wait for the next tile (its reductions have had a tile's time to complete, so the
    // release fence is short), "eager" = right after issuing them (the fence waits for them).
    const bool late = ho == kMbarrier || ho == kRendezvous || bulk;

    const int nq = a.nq, nk = a.nk;
    const int nqt = a.group * nq;  // flattened query tiles it = (h - h0) * nq + query tile
    const int jt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int h0 = hk * a.group;  // the group's first query head
    const int64_t bh = static_cast<int64_t>(b) * a.H + h0;
    const int seg = jt / a.seg_size, seg_pos = jt % a.seg_size;
    const int seg_len = min(a.seg_size, nk - seg * a.seg_size);
    const bool ordered = a.mode == taca_bwd::kOrdered && nk > 1;
    // Layouts (seg, b, h, tile) and (seg, b, h, Np rows): flattened tile it is entry it from h0.
    int *sem_row = a.sem + (seg * static_cast<int64_t>(a.B) * a.H + bh) * nq;
    float *acc_base = a.dq_acc + (seg * static_cast<int64_t>(a.B) * a.H + bh) * a.Np * DP;

    if (WRITER && mbar) {
        if (threadIdx.x == 0) {
            mbar_init(mb_full, 256);  // every MMA thread arrives once per staged tile
            mbar_init(mb_full + 8, 256);
            mbar_init(mb_empty, 128);  // every writer thread arrives once per tile read
            mbar_init(mb_empty + 8, 128);
        }
        __syncthreads();  // initialised before any thread arrives or waits
    }
    if (WRITER && threadIdx.x >= 256) {
        // dQ writer warpgroup: adds each query tile's dQ part (staged in shared memory by the MMA
        // warpgroups) to this chain's float32 buffer in chain order (wait for the predecessor,
        // add with red.v4 / store, fence, release).
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (nk == 1 || a.mode == taca_bwd::kSkip) return;
        const int wtid = threadIdx.x - 256;
        const bool first = ordered ? seg_pos == 0 : a.mode == taca_bwd::kRacy;
        float *accb = ordered ? acc_base : a.dq_acc + bh * a.Np * DP;
        const bool releases = ordered && seg_pos < seg_len - 1;
        for (int it = 0; it < nqt; ++it) {
            const int buf = it & 1;
            if (mbar) mbar_wait(mb_full + 8 * buf, (it >> 1) & 1);  // tile it staged
            else bar_sync(BAR_FULL + buf, 384);
            if (late && releases && it > 0) {
                // Release tile it - 1 once every writer thread issued its adds (in rendezvous
                // mode the 384-thread barrier above says so; bulk: once they completed).
                if (bulk) bulk_wait_write();
                if (!rdv) bar_sync(BAR_WRITER, 128);
                if (wtid == 0) {
                    __threadfence();
                    atomicExch(sem_row + it - 1, seg_pos + 1);
                }
            }
            if (ordered && seg_pos > 0) {
                if (wtid == 0) {
                    while (taca_bwd::ld_acquire(sem_row + it) < seg_pos) {
                    }
                }
                bar_sync(BAR_WRITER, 128);
            }
            const unsigned char *src = stage + buf * C::STAGE_BYTES;
            float *dst = accb + static_cast<int64_t>(it) * BM * DP;
            if (bulk) {
                if (ordered && seg_pos > 0) asm volatile("fence.proxy.async.global;\n" ::: "memory");
                for (int r = wtid; r < BM; r += 128) {  // one row (DP fp32) per bulk operation
                    const uint32_t srow = smem_u32(src + r * C::SROW);
                    if (first) bulk_store(dst + r * DP, srow, DP * 4);
                    else bulk_add_f32(dst + r * DP, srow, DP * 4);
                }
                bulk_commit();
                bulk_wait_read();
                mbar_arrive(mb_empty + 8 * buf);  // staging buffer free again
                continue;
            }
#pragma unroll 2
            for (int idx = wtid; idx < BM * DP / 4; idx += 128) {
                const int r = idx / (DP / 4), c4 = idx % (DP / 4);
                const float4 v = *reinterpret_cast<const float4 *>(src + r * C::SROW + c4 * 16);
                if (first) __stcg(reinterpret_cast<float4 *>(dst + r * DP + c4 * 4), v);
                else red_add4(dst + r * DP + c4 * 4, v);
            }
            if (mbar) mbar_arrive(mb_empty + 8 * buf);  // staging buffer free again
            else if (!rdv && it + 2 < nqt) bar_arrive(BAR_EMPTY + buf, 384);
            if (!late && releases) {
                bar_sync(BAR_WRITER, 128);  // every writer thread issued its adds
                if (wtid == 0) {
                    __threadfence();
                    atomicExch(sem_row + it, seg_pos + 1);
                }
            }
        }
        if (bulk) bulk_wait_write();  // the CTA may not end before its bulk operations did
        if (late && releases) {
            bar_sync(BAR_WRITER, 128);
            if (wtid == 0) {
                __threadfence();
                atomicExch(sem_row + nqt - 1, seg_pos + 1);
            }
        }
        return;
    }
    if (WRITER) asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    // The MMA warpgroups' CTA-wide syncs: all threads without a writer (v4a: barrier 0).
    auto mma_sync = [] {
        if (WRITER) bar_sync(BAR_MMA, 256);
        else __syncthreads();
    };

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = jt * BN;
    const int N = a.N, Nk = a.Nk, D = a.D;
    // A key mask whose keys of this tile all attend: unmasked paths (as bwd_main)
    const bool masked = MASK && !(a.mask.q == 0 && (a.mask.h == 0 || a.group == 1) &&
                                  keys_attend<BN>(a.mask, b * a.mask.b + h0 * a.mask.h, j0, Nk, lane));

    const T *kb = static_cast<const T *>(a.k) + b * a.ks_b + hk * a.ks_h;
    const T *vb = static_cast<const T *>(a.v) + b * a.vs_b + hk * a.vs_h;
    const float *lse2b = a.lse2 + bh * a.Np;
    const float *deltab = a.delta + bh * a.Np;

    const float gam = a.gamma[b];
    const float grev = a.gamma_reverse;
    const float lg = a.scale * taca_bwd::kLog2e;

    // Keys past Nk: zero rows of K and V (as bwd_main), never stored.
    load_tile_sw128<T, BN, DP, 256>(sk, kb, a.ks_n, j0, Nk, D, tid);
    load_tile_sw128<T, BN, DP, 256>(sv, vb, a.vs_n, j0, Nk, D, tid);
    auto load_q_tile = [&](int it, int buf) {
        const int hh = it / nq;
        const int i0 = (it - hh * nq) * BM;
        const T *qp = static_cast<const T *>(a.q) + b * a.qs_b + (h0 + hh) * a.qs_h;
        const T *dop = static_cast<const T *>(a.dout) + b * a.dos_b + (h0 + hh) * a.dos_h;
        load_tile_sw128<T, BM, DP, 256>(sq + buf * C::QT_BYTES, qp, a.qs_n, i0, N, D, tid);
        load_tile_sw128<T, BM, DP, 256>(sdo + buf * C::QT_BYTES, dop, a.dos_n, i0, N, D, tid);
        if (tid < BM / 4) {
            cp_async_16(smem_u32(sL + buf * BM + tid * 4), lse2b + it * BM + tid * 4, 16);
        } else if (tid < BM / 2) {
            const int u = tid - BM / 4;
            cp_async_16(smem_u32(sDl + buf * BM + u * 4), deltab + it * BM + u * 4, 16);
        }
    };
    load_q_tile(0, 0);
    cp_async_commit();

    // This thread's key rows in S^T: 64 wg + 16 warp + g and + 8.
    const int kw0 = j0 + 64 * wg;  // the warpgroup's first key
    const int kr0 = kw0 + 16 * warp + g, kr1 = kr0 + 8;
    // Text spans of sample b {keys [begin, end), queries [begin, end)} in shared memory, read
    // (and the key tests redone) at every tile after the barrier at its top: values held in
    // registers across the loop cost spills (per-sample spans are global loads).
    __shared__ int s_span[4];
    if (tid == 0) {
        const Span sp =
            span_of(a.spans, b, a.text_begin, a.text_end, a.q_text_begin, a.q_text_end);
        s_span[0] = sp.kb;
        s_span[1] = sp.ke;
        s_span[2] = sp.qb;
        s_span[3] = sp.qe;
    }

    float dv[DP / 2], dk[DP / 2];
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) dv[i] = dk[i] = 0.f;

    const uint32_t k_wg = sk + wg * 64 * 128, v_wg = sv + wg * 64 * 128;  // rows 64 wg.. of each block

    for (int it = 0; it < nqt; ++it) {
        const int buf = it & 1;
        const int hh = it / nq;              // query head h0 + hh
        const int i0 = (it - hh * nq) * BM;  // its query tile's first row
        cp_async_wait<0>();
        fence_proxy_async();
        // Tile it landed and is visible to wgmma; every warpgroup finished tile it - 1 (its
        // wgmma reads of buffer buf ^ 1 and of dS' completed before its wgmma_wait<0>).
        mma_sync();
        if (!WRITER && ordered && tid == 0 && it > 0 && seg_pos < seg_len - 1) {
            // Release the previous query tile's dQ part (see bwd_main / taca_bwd.cu).
            __threadfence();
            atomicExch(sem_row + it - 1, seg_pos + 1);
        }
        if (it + 1 < nqt) load_q_tile(it + 1, buf ^ 1);
        cp_async_commit();

        const uint32_t qt = sq + buf * C::QT_BYTES, dot = sdo + buf * C::QT_BYTES;
        float s[NT * 4], dp[NT * 4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk)  // 16 columns = 32 B inside a 128 B row
            wgmma_ss<T, BM, 0, 0>(s, desc_sw128(k_wg + (kk >> 2) * BN * 128 + (kk & 3) * 32),
                                  desc_sw128(qt + (kk >> 2) * BM * 128 + (kk & 3) * 32), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk)
            wgmma_ss<T, BM, 0, 0>(dp, desc_sw128(v_wg + (kk >> 2) * BN * 128 + (kk & 3) * 32),
                                  desc_sw128(dot + (kk >> 2) * BM * 128 + (kk & 3) * 32), kk > 0);
        wgmma_commit();
        wgmma_wait<1>();
        fence_regs<NT * 4>(s);

        // P^T = exp2(S^T lg m [+ log2e mask] - lse2) while dP^T is computed;
        // then dS'^T = m P^T (dP^T - delta).
        const float *lrow = sL + buf * BM;
        const float *drow = sDl + buf * BM;
        const int ksb = s_span[0], kse = s_span[1];  // key text span [ksb, kse)
        const int qsb = s_span[2], qse = s_span[3];  // query text span [qsb, qse)
        const bool kt0 = kr0 >= ksb && kr0 < kse, kt1 = kr1 >= ksb && kr1 < kse;
        // Uniform m over the warpgroup's keys; never with a mask (its term is per element).
        const bool k_uniform =
            !masked && (kw0 + 64 <= ksb || kw0 >= kse || (kw0 >= ksb && kw0 + 64 <= kse));
        const bool k_text = kw0 >= ksb && kw0 < kse;
        const int iend = i0 + BM;
        const bool q_uniform = iend <= qsb || i0 >= qse || (i0 >= qsb && iend <= qse);
        const bool uniform = k_uniform && q_uniform;
        const bool q_text = i0 >= qsb && i0 < qse;
        const float mu = (k_text == q_text) ? 1.f : (q_text ? grev : gam);
        if (uniform) {
            const float cf = lg * mu;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt * 4 + e] = fast_exp2(s[nt * 4 + e] * cf - ((e & 1) ? l2.y : l2.x));
            }
        } else if (!masked) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * t;
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + col);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = i0 + col + (e & 1);
                    const bool qtx = qi >= qsb && qi < qse;
                    const bool ktx = (e < 2) ? kt0 : kt1;
                    const float m = (qtx == ktx) ? 1.f : (qtx ? grev : gam);
                    s[nt * 4 + e] = fast_exp2(s[nt * 4 + e] * (lg * m) - ((e & 1) ? l2.y : l2.x));
                }
            }
        } else if (a.mask_keys) {
            // A key mask: the thread's two key terms once per tile (as v6; the same sums)
            const float2 mk = key_mask_terms(a.mask, b * a.mask.b + (h0 + hh) * a.mask.h, kr0, Nk);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * t;
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + col);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = i0 + col + (e & 1);
                    const bool qtx = qi >= qsb && qi < qse;
                    const bool ktx = (e < 2) ? kt0 : kt1;
                    const float m = (qtx == ktx) ? 1.f : (qtx ? grev : gam);
                    const float mt = qi < N ? ((e < 2) ? mk.x : mk.y) : -INFINITY;
                    s[nt * 4 + e] =
                        fast_exp2(s[nt * 4 + e] * (lg * m) + mt - ((e & 1) ? l2.y : l2.x));
                }
            }
        } else {
            // Masked: + log2(e) mask_ij per element (S^T: key row kr, query column qi); -inf
            // outside N x Nk (padding: P = 0, no out-of-bounds read).
            // Mask offsets of (b, h, i0 + 2t, kr0) and (.., kr1): element (qi, kr) adds
            // (qi - i0 - 2t) * mask.q (mask_log2 with that base, i = qi - i0 - 2t, j = 0).
            const int64_t mo0 = b * a.mask.b + (h0 + hh) * a.mask.h +
                                static_cast<int64_t>(i0 + 2 * t) * a.mask.q + kr0 * a.mask.k;
            const int64_t mo1 = mo0 + 8 * a.mask.k;
            const bool kin0 = kr0 < Nk, kin1 = kr1 < Nk;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * t;
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + col);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = i0 + col + (e & 1);
                    const bool qtx = qi >= qsb && qi < qse;
                    const bool ktx = (e < 2) ? kt0 : kt1;
                    const float m = (qtx == ktx) ? 1.f : (qtx ? grev : gam);
                    const float mt = (qi < N && ((e < 2) ? kin0 : kin1))
                                         ? mask_log2(a.mask, (e < 2) ? mo0 : mo1, nt * 8 + (e & 1), 0)
                                         : -INFINITY;
                    s[nt * 4 + e] =
                        fast_exp2(s[nt * 4 + e] * (lg * m) + mt - ((e & 1) ? l2.y : l2.x));
                }
            }
        }
        wgmma_wait<0>();
        fence_regs<NT * 4>(dp);
        if (uniform) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float2 dl = *reinterpret_cast<const float2 *>(drow + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dp[nt * 4 + e] = s[nt * 4 + e] * (dp[nt * 4 + e] - ((e & 1) ? dl.y : dl.x)) * mu;
            }
        } else {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * t;
                const float2 dl = *reinterpret_cast<const float2 *>(drow + col);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = i0 + col + (e & 1);
                    const bool qtx = qi >= qsb && qi < qse;
                    const bool ktx = (e < 2) ? kt0 : kt1;
                    const float m = (qtx == ktx) ? 1.f : (qtx ? grev : gam);
                    dp[nt * 4 + e] = s[nt * 4 + e] * (dp[nt * 4 + e] - ((e & 1) ? dl.y : dl.x)) * m;
                }
            }
        }

        // Pack P^T and dS'^T as A fragments (16 queries per k-step); dS' transposed to smem.
        uint32_t pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            const float *s0 = s + 8 * kk, *d0 = dp + 8 * kk;  // column tiles 2kk, 2kk + 1
            pa[kk][0] = pack2<T>(s0[0], s0[1]);
            pa[kk][1] = pack2<T>(s0[2], s0[3]);
            pa[kk][2] = pack2<T>(s0[4], s0[5]);
            pa[kk][3] = pack2<T>(s0[6], s0[7]);
            da[kk][0] = pack2<T>(d0[0], d0[1]);
            da[kk][1] = pack2<T>(d0[2], d0[3]);
            da[kk][2] = pack2<T>(d0[4], d0[5]);
            da[kk][3] = pack2<T>(d0[6], d0[7]);
            store_block_trans<BM>(sds, da[kk], 64 * wg + 16 * warp, 16 * kk, lane);
        }

        // dV += P^T dO, dK += dS'^T Q (B = dO / Q tiles, N-major: query rows = the k dim).
        fence_regs<DP / 2>(dv);
        fence_regs<DP / 2>(dk);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
            for (int hb = 0; hb < DP / 64; ++hb) {
                wgmma_rs<T, 64, 1>(dv + hb * 32, pa[kk], desc_sw128(dot + hb * BM * 128 + kk * 16 * 128), 1);
                wgmma_rs<T, 64, 1>(dk + hb * 32, da[kk], desc_sw128(qt + hb * BM * 128 + kk * 16 * 128), 1);
            }
        wgmma_commit();

        fence_proxy_async();  // the stmatrix writes of dS' -> visible to wgmma after the barrier
        mma_sync();  // dS' complete in shared memory

        if (a.mode == taca_bwd::kSkip) {
            wgmma_wait<0>();
            fence_regs<DP / 2>(dv);
            fence_regs<DP / 2>(dk);
            fence_regs<BM / 4>(&pa[0][0]);
            fence_regs<BM / 4>(&da[0][0]);
            continue;
        }
        // Without a writer: ask for this tile's order before the dQ matmul (latency hidden).
        int polled = 0;
        if (!WRITER && ordered && tid == 0 && seg_pos > 0) polled = taca_bwd::ld_acquire(sem_row + it);
        // dQ part (64 x 64 per warpgroup) = dS' K over the 128 keys.
        constexpr int QROWS = BM == 128 ? 64 : 0;  // D = 64: split rows; D = 128: split columns
        constexpr int QCOLS = BM == 128 ? 0 : 64;
        float dq[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            wgmma_ss<T, 64, 0, 1>(dq,
                                  desc_sw128(sds + (kk >> 2) * BM * 128 + QROWS * wg * 128 + (kk & 3) * 32),
                                  desc_sw128(sk + (QCOLS / 64) * wg * BN * 128 + kk * 16 * 128), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs<32>(dq);
        fence_regs<DP / 2>(dv);
        fence_regs<DP / 2>(dk);
        fence_regs<BM / 4>(&pa[0][0]);  // A operands stay untouched until their wgmma completed
        fence_regs<BM / 4>(&da[0][0]);

        const int qr0 = QROWS * wg + 16 * warp + g;  // this thread's dQ rows qr0, qr0 + 8 (tile)
        const int qc0 = QCOLS * wg + 2 * t;          // and columns qc0 + 8 nt, + 1
        if (nk == 1) {
            T *dqb = static_cast<T *>(a.dq) + b * a.dqs_b + (h0 + hh) * a.dqs_h;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = i0 + qr0 + half * 8;
                if (r >= N) continue;
                T *dqrow = dqb + static_cast<int64_t>(r) * a.dqs_n;
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
                    taca_bwd::store_pair<T>(dqrow, qc0 + nt * 8, D, a.pair_store != 0,
                                            dq[nt * 4 + 2 * half] * a.scale, dq[nt * 4 + 2 * half + 1] * a.scale);
            }
            continue;
        }
        if (!WRITER) {
            // Chain order: key tile seg_pos adds only after seg_pos - 1 released this query tile.
            const bool first = ordered ? seg_pos == 0 : a.mode == taca_bwd::kRacy;
            if (ordered && seg_pos > 0) {
                if (tid == 0) {
                    while (polled < seg_pos) polled = taca_bwd::ld_acquire(sem_row + it);
                }
                __syncthreads();
            }
            float *accp = (ordered ? acc_base : a.dq_acc + bh * a.Np * DP) +
                          static_cast<int64_t>(it) * BM * DP;  // head h0 + hh, rows i0..
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = qr0 + half * 8;
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    float *dst = accp + r * DP + qc0 + nt * 8;
                    if (first)
                        __stcg(reinterpret_cast<float2 *>(dst),
                               make_float2(dq[nt * 4 + 2 * half], dq[nt * 4 + 2 * half + 1]));
                    else
                        taca_bwd::red_add2(dst, dq[nt * 4 + 2 * half], dq[nt * 4 + 2 * half + 1]);
                }
            }
            continue;
        }
        // Hand the part to the writer warpgroup through staging buffer buf (free once the writer
        // has read tile it - 2 from it: in rendezvous mode the barrier of tile it - 1 says so).
        if (mbar) {
            if (it >= 2) mbar_wait(mb_empty + 8 * buf, ((it >> 1) - 1) & 1);
        } else if (!rdv && it >= 2) {
            bar_sync(BAR_EMPTY + buf, 384);
        }
        unsigned char *dstage = stage + buf * C::STAGE_BYTES;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = qr0 + half * 8;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
                *reinterpret_cast<float2 *>(dstage + r * C::SROW + (qc0 + nt * 8) * 4) =
                    make_float2(dq[nt * 4 + 2 * half], dq[nt * 4 + 2 * half + 1]);
        }
        if (bulk) fence_proxy_async();  // the copy engine (async proxy) reads what these generic stores wrote
        if (mbar) mbar_arrive(mb_full + 8 * buf);
        else if (rdv) bar_sync(BAR_FULL + buf, 384);  // rendezvous: the writer finished tile it - 1
        else bar_arrive(BAR_FULL + buf, 384);
    }
    cp_async_wait<0>();
    if (!WRITER && ordered && seg_pos < seg_len - 1) {
        __syncthreads();
        if (tid == 0) {
            __threadfence();
            atomicExch(sem_row + nqt - 1, seg_pos + 1);
        }
    }
    // dK = scale * dK', dV (summed over the group) of key/value head hk: rows kr0, kr1;
    // columns 8 nt + 2t, + 1.
    taca_bwd::store_dk_dv<T, DP / 8>(a, b, hk, Nk, D, kr0, kr1, 0, t, dk, dv);
#else
    (void)a; (void)ho;
#endif
}

template <typename T, int DP, bool WRITER>
int launch(const BwdArgs &a, cudaStream_t stream, int ho) {
    using C = Cfg<DP, WRITER>;
    if (a.Np % C::BM != 0 || a.Np != a.nq * C::BM) return TACA_ERR_UNSUPPORTED;  // workspace layout
    auto kernel = a.mask.data ? taca_bwd_sm90_kernel<T, DP, WRITER, true>
                              : taca_bwd_sm90_kernel<T, DP, WRITER, false>;
    // The kernel has a body only in an sm_90a binary: check which one this device runs.
    cudaFuncAttributes attr;
    TACA_CUDA_TRY(cudaFuncGetAttributes(&attr, kernel), "taca_bwd_cuda (sm90): cudaFuncGetAttributes");
    if (attr.binaryVersion != 90) return TACA_ERR_UNSUPPORTED;
    TACA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM),
                  "taca_bwd_cuda (sm90): cudaFuncSetAttribute");
    const int64_t rows = static_cast<int64_t>(a.B) * a.H * a.Np;
    int st = taca_bwd::launch_preprocess<T, DP>(a, stream, "taca_bwd_cuda (sm90) preprocess");
    if (st != TACA_OK) return st;
    if (a.mode == taca_bwd::kAtomic && a.nk > 1) {
        TACA_CUDA_TRY(cudaMemsetAsync(a.dq_acc, 0, static_cast<size_t>(rows) * DP * sizeof(float), stream),
                      "taca_bwd_cuda (sm90) memset dq_acc");
    }
    kernel<<<dim3(a.nk, a.Hkv, a.B), C::THREADS, C::SMEM, stream>>>(a, ho);
    st = taca_cuda_check_launch("taca_bwd_cuda (sm90) main");
    if (st != TACA_OK || a.nk == 1) return st;
    return taca_bwd::launch_dq_convert<T, DP>(a, stream, "taca_bwd_cuda (sm90) dq convert");
}

template <typename T, int DP>
int launch_ho(const BwdArgs &a, cudaStream_t stream, int ho) {
    return ho == kNone ? launch<T, DP, false>(a, stream, ho) : launch<T, DP, true>(a, stream, ho);
}

}  // namespace taca_bwd90

/* TACA_ERR_UNSUPPORTED when this path does not apply (the caller then takes mma.sync). */
int taca_bwd_sm90(const taca_bwd::BwdArgs &a, cudaStream_t stream, bool bf16) {
#if defined(TACA_HAVE_SM90A)
    if ((a.D != 64 && (a.D < 72 || a.D > 128)) || !a.vec_load) return TACA_ERR_UNSUPPORTED;
    const int dev_st = taca_sm90::device_is_sm90("taca_bwd_cuda (sm90): device query");
    if (dev_st != TACA_OK) return dev_st;
    // dQ hand-off (a test / timing knob, see the file header): bulk unless asked otherwise.
    int ho = taca_bwd90::kBulk;
    if (const char *e = getenv("TACA_BWD_SM90_HANDOFF")) {
        if (!strcmp(e, "mbarrier")) ho = taca_bwd90::kMbarrier;
        else if (!strcmp(e, "mbarrier-eager")) ho = taca_bwd90::kMbarrierEager;
        else if (!strcmp(e, "rendezvous")) ho = taca_bwd90::kRendezvous;
        else if (!strcmp(e, "arrive")) ho = taca_bwd90::kArrive;
        else if (!strcmp(e, "none")) ho = taca_bwd90::kNone;
    }
    if (a.D == 64)
        return bf16 ? taca_bwd90::launch_ho<__nv_bfloat16, 64>(a, stream, ho)
                    : taca_bwd90::launch_ho<__half, 64>(a, stream, ho);
    return bf16 ? taca_bwd90::launch_ho<__nv_bfloat16, 128>(a, stream, ho)
                : taca_bwd90::launch_ho<__half, 128>(a, stream, ho);
#else
    (void)a; (void)stream; (void)bf16;
    return TACA_ERR_UNSUPPORTED;
#endif
}
