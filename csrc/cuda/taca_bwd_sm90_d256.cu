/*
 * taca_bwd_sm90_d256.cu: Hopper (sm_90a) backward main kernel for head dims 136..256 (padded to DP = 256), wgmma
 * (configuration A1 of docs/d256_backward_design.md). Before it D = 256 ran the mma.sync kernel (taca_bwd_kernel.cuh,
 * two CTAs per key tile of 128 columns each, S and dP recomputed in both: ~137 TFLOP/s on an H200, fwd+bwd 0.46x plain
 * cuDNN at AuraFlow CFG). v6's layout (each MMA warpgroup owning 64 keys x every column of dK and dV) needs
 * BN * D / 128 accumulator registers a thread for dK + dV: 256 at D = 256, so here the columns are split instead:
 *
 *   CTA = one key tile of BN = 64 keys (K, V in shared memory for the whole loop), walking the flattened query tiles
 *   of BM = 64 queries of its key/value head's group (GQA) as v6 does (skew, chains, workspace, conversion alike).
 *   384 threads: two MMA warpgroups (setmaxnreg 240), a producer warp (8: Q by TMA into a two-deep ring, dO by TMA
 *   into one buffer, lse2 / delta by its lanes), two dQ writer warps (9, 10: one per MMA warpgroup), one idle warp.
 *   Per query tile, MMA warpgroup wg:
 *     S^T  = K Q^T    keys x queries [32 wg, 32 wg + 32)        m64n32k16 x 16, SS        16 accumulators
 *     dP^T = V dO^T   same                                       m64n32k16 x 16, SS        16
 *     P^T, dS'^T of those 32 queries (gamma per (query, key) as v6), stored bf16 / fp16 into shared memory:
 *       P^T and dS'^T as they are ([64 keys][64 queries], stmatrix), dS' transposed ([64 queries][64 keys],
 *       stmatrix .trans); one barrier of the 256 MMA threads publishes the three (each warpgroup needs both halves)
 *     dV[64 keys][128 wg ..+128] += P^T dO                       m64n128k16 x 4, SS (dO N-major)   64
 *     dK[64 keys][128 wg ..+128] += dS'^T Q                      m64n128k16 x 4, SS (Q N-major)    64
 *     dQ[64 queries][128 wg ..+128] = dS' K, in two slices of 64 columns (m64n64k16 x 4 each, K N-major), each
 *       staged (fp32, the tensor writer's 128B-swizzled boxes of 32 columns) into the warpgroup's 16 KiB staging
 *       buffer and added by its writer warp with two 2-D TMA tensor reduce-adds (the chain's first link stores).
 *   No product is recomputed (FLOPs per tile 10 BM BN D: v6's count; the mma.sync kernel made 14).
 *   Per-thread accumulators: 128 (dK, dV) + 32 (S^T, dP^T) during the exponentials, 128 + 32 (one dQ slice) after.
 * Shared memory (1024-aligned base): K 32 KiB, V 32 KiB, Q [2] 64 KiB, dO 32 KiB, P^T / dS'^T / dS' 8 KiB each,
 *   staging [2] 16 KiB each, lse2 / delta [2][64] fp32, 11 mbarriers: 223,336 bytes with the alignment slack.
 * Determinism: a tile's dQ is added in one fixed order per chain (v6's chains and skew): both writers of a CTA poll the
 *   predecessor's release of the tile, add their column half, wait for their writes, meet at a named barrier and
 *   writer 0 releases the tile (st.release), so the conversion (bwd_dq_convert_tiles, BM = 64) and the successor see
 *   both halves. Unordered mode (deterministic=False): adds without order into one zeroed buffer.
 * Workspace: the D = 256 layout of taca_bwd.cu (rows rounded up to 64 for this kernel's tiles where it is enabled;
 *   nk, chains counted
 *   in 128-key tiles there, re-counted here in 64-key tiles: never more chains than the workspace holds; the dQ
 *   buffers' rows read with stride DP (acc_ld = 256 <= DP + kAccPad)).
 * Masks: their own instance (MASK), v6's paths: a key mask's two terms a thread per query tile (and CTAs whose 64
 *   keys all attend take the unmasked paths), any other mask per element.
 * Not taken (TACA_ERR_UNSUPPORTED, the mma.sync kernel runs): a single 128-key tile (N_k <= 128: no dQ
 *   buffer in the workspace), unaligned rows (vec_load), tensor maps the driver rejects, non-sm90a binaries.
 *   TACA_BWD_D256=wgmma / mma forces one kernel (a test and timing switch, read per call); kDefault (in
 *   taca_bwd_sm90_d256_enabled below) says which runs without it.
 * OWN (TACA_BWD_D256_OWN=1, read per call; opt-in, not yet run on a GPU): each warpgroup issues dV and dK over its own
 *   32 queries right after making P^T / dS'^T, from its registers (RS, the exponentials' A fragments), before the
 *   barrier; after it only the other warpgroup's 32 queries are read from shared memory (SS). The tensor cores then
 *   have the own halves' 4 m64n128k16 per warpgroup during the exponentials, stores and barrier, where the default
 *   leaves them idle. dQ's products are unchanged (dq bitwise the same); dK / dV of the second warpgroup's columns
 *   sum the four query steps in another order. Registers: the two A fragments (16) stay live until the wait after dQ
 *   slice 0 (SASS: highest register R219 of the MMA warps' 240 unmasked, R204 by default; R235 masked, as by default;
 *   no spill beyond the producer's 8 bytes; nothing serialized).
 * Diagnostics (read per call; the default instances' tile loop unchanged by them): TACA_BWD_D256_TRACE=1 runs the
 *   trace instance (kTraceSlots below; benchmarks/bwd_trace.py --kernel d256), TACA_BWD_MODE=skipdq writes no dQ
 *   and =racy stores the parts without order (timing modes: dq wrong on purpose, dK / dV unchanged).
 * Build check: nvcc -std=c++17 -O3 --use_fast_math -Icsrc -Icsrc/cuda -DTACA_HAVE_SM90A=1 \
 *   -gencode=arch=compute_90a,code=sm_90a -c csrc/cuda/taca_bwd_sm90_d256.cu -o /tmp/x.o -Xptxas -v
 */
#include <stdlib.h>
#include <string.h>

#include "taca_bwd_kernel.cuh"
#include "taca_bwd_sm90.cuh"
#include "taca_sm90.cuh"

namespace taca_bwd256 {

using namespace taca_cuda;
using namespace taca_sm90;
using namespace taca_wgmma;
using taca_bwd::BwdArgs;
using taca_bwd90::bulk_commit;
using taca_bwd90::bulk_wait_read;
using taca_bwd90::bulk_wait_write;
using taca_bwd90::encode_acc_map;
using taca_bwd90::store_block;
using taca_bwd90::store_block_trans;

struct Cfg {
    static constexpr int DP = 256, BM = 64, BN = 64;
    static constexpr int THREADS = 384;
    static constexpr uint32_t KV_BYTES = BN * DP * 2;         // 32 KiB: 4 blocks of [64 rows][128 B]
    static constexpr uint32_t QT_BYTES = BM * DP * 2;         // one Q or dO tile
    static constexpr uint32_t PT_BYTES = BN * BM * 2;         // P^T, dS'^T, dS': 8 KiB each
    static constexpr uint32_t STAGE_BYTES = BM * 64 * 4;      // one 64-column fp32 slice: 2 boxes of [64][128 B]
    static constexpr int ACC_LD = DP;                         // the dQ buffers' row stride (tensor writer)
    // offsets from the 1024-aligned base
    static constexpr uint32_t OFF_K = 0, OFF_V = KV_BYTES, OFF_Q = 2 * KV_BYTES, OFF_DO = OFF_Q + 2 * QT_BYTES;
    static constexpr uint32_t OFF_PT = OFF_DO + QT_BYTES, OFF_DST = OFF_PT + PT_BYTES, OFF_DS = OFF_DST + PT_BYTES;
    static constexpr uint32_t OFF_ST = OFF_DS + PT_BYTES;                 // [2] staging (1024-aligned: the boxes)
    static constexpr uint32_t OFF_L = OFF_ST + 2 * STAGE_BYTES;           // lse2 [2][BM], delta [2][BM] fp32
    static constexpr uint32_t OFF_BAR = OFF_L + 4 * BM * 4;
    // q_full[2], q_empty[2], do_full, do_empty, pds_free, st_full[2], st_empty[2]
    static constexpr int NBAR = 11;
    static constexpr size_t SMEM = OFF_BAR + NBAR * 8 + 1024;  // + the base's alignment slack
    static_assert(SMEM <= 232448, "shared memory");
    static_assert(OFF_ST % 1024 == 0 && OFF_PT % 1024 == 0, "swizzle atoms");
};

enum { BAR_MMA = 1, BAR_WR = 2 };  // named barriers: the 256 MMA threads; the two writer warps

struct D256Args {
    CUtensorMap tq, tdo;
    CUtensorMap tacc;  // dq_acc as 2-D fp32 (DP columns, every workspace row), 32 x BM boxes, 128B swizzle
    BwdArgs a;
    int pos_q[3], pos_do[3];
};

/* The trace instances (TACA_BWD_D256_TRACE=1, read per call; bf16 / fp16 without a mask; the default instances have
 * none of it, TRACE = false): where each CTA's time goes, kTraceSlots 64-bit values at g_trace256[cta id] for the
 * first kTraceCtas CTAs (cta id = x + nk (y + Hkv z)), added by red.global into slots zeroed by
 * taca_bwd256_trace_reset, read by taca_bwd256_trace_read (benchmarks/bwd_trace.py --kernel d256). Slots:
 *   0 SM id, 1 start (globaltimer ns), 2 MMA thread 0's loop end (ns), 3 key tile | chain position << 16 | chain << 24
 *   | KV head << 32 | batch << 48, 4 MMA thread 0's cycles from its loop's start to its end, 5 query tiles walked;
 *   6 + TSeg: MMA thread 0's cycles in each segment of the tile loop (every cycle of the loop in exactly one);
 *   kTrWriter + 5 w (writer warp w = 0, 1, lane 0): cycles polling the chain predecessor, waiting for a staged slice
 *   (st_full), issuing the slice's TMA operations and waiting for the copy engine's reads, releasing the tile (its
 *   writes, the fence, BAR_WR); its end (ns);
 *   kTrProducer, + 1: the producer's lane 0 cycles waiting for a free Q slot (q_empty), for dO's buffer (do_empty);
 *   kTrLoopStart: MMA thread 0's loop start (ns; K and V loaded, slot 4 counted from here).
 * The instrumentation costs time itself (clock reads, one red a segment): compare modes within the trace instance. */
constexpr int kTraceSlots = 40, kTraceCtas = 4096;
enum TSeg {
    kSegQ,    // waiting for Q / lse2 / delta of the tile (q_full)
    kSegS,    // issuing S^T
    kSegDo,   // waiting for dO (do_full)
    kSegDp,   // issuing dP^T, waiting for S^T (wgmma_wait<1>)
    kSegExp,  // the exponentials, P^T packed
    kSegPds,  // waiting for the previous tile's products to free P^T / dS'^T / dS' (pds_free)
    kSegPst,  // P^T stored (OWN: dV's own half issued), waiting for dP^T
    kSegDs,   // dS'^T computed, packed and stored with dS' (transposed; OWN: dK's own half issued), the fence
    kSegBar,  // the 256 MMA threads' barrier (BAR_MMA)
    kSegMma,  // issuing dV, dQ slice 0, dK; waiting for dV and slice 0 (wgmma_wait<1>)
    kSegE0,   // waiting for the staging buffer (st_empty) for slice 0
    kSegSt0,  // staging slice 0
    kSegDq1,  // issuing dQ slice 1, waiting for it and dK (wgmma_wait<0>)
    kSegE1,   // waiting for the staging buffer for slice 1
    kSegSt1,  // staging slice 1
    kSegs
};
constexpr int kTrSeg = 6, kTrWriter = kTrSeg + kSegs, kTrProducer = kTrWriter + 10, kTrLoopStart = kTrProducer + 2;
static_assert(kTrLoopStart < kTraceSlots, "trace slots");
__device__ unsigned long long g_trace256[kTraceCtas * kTraceSlots];

__device__ __forceinline__ uint32_t trace_clock() {
    uint32_t c;
    asm volatile("mov.u32 %0, %%clock;\n" : "=r"(c)::"memory");
    return c;
}
__device__ __forceinline__ unsigned long long trace_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t)::"memory");
    return t;
}
__device__ __forceinline__ uint32_t trace_smid() {
    uint32_t v;
    asm volatile("mov.u32 %0, %%smid;\n" : "=r"(v));
    return v;
}
/* Adds the cycles since *c0 to slot *tr (when tr is set) and restarts the count. */
__device__ __forceinline__ void trace_lap(unsigned long long *tr, uint32_t &c0) {
    const uint32_t c = trace_clock();
    if (tr) atomicAdd(tr, static_cast<unsigned long long>(c - c0));
    c0 = c;
}

/* A 64-column dQ slice of a warpgroup (m64n64 accumulator: rows 16 warp + g, + 8; columns 8 nt + 2t, + 1) into its
 * staging buffer dst, in the tensor writer's layout (2 boxes of 32 fp32 columns x BM rows, 128B-swizzled), then
 * announced (full). The caller waits first for the writer to have read the previous slice from it (st_empty). */
__device__ __forceinline__ void stage_slice(unsigned char *dst, const float (&q)[32], int warp, int g, int t,
                                            uint32_t full) {
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            const int r = 16 * warp + g + half * 8, col = nt * 8 + 2 * t;
            const uint32_t off = sw128_offset<Cfg::BM>(r, col >> 2) + (col & 3) * 4;
            *reinterpret_cast<float2 *>(dst + off) = make_float2(q[nt * 4 + 2 * half], q[nt * 4 + 2 * half + 1]);
        }
    fence_proxy_async();  // the copy engine (async proxy) reads what these generic stores wrote
    mbar_arrive(full);
}

template <typename T, bool MASK, bool TRACE, bool OWN>
__global__ void __launch_bounds__(384, 1) taca_bwd_sm90_d256_kernel(const __grid_constant__ D256Args p) {
#if TACA_SM90A
    using C = Cfg;
    constexpr int BM = C::BM, BN = C::BN, DP = C::DP;
    const BwdArgs &a = p.a;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __shared__ int s_span[4];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    unsigned char *const smem = smem_raw + (base - raw);
    const uint32_t sk = base + C::OFF_K, sv = base + C::OFF_V, sq = base + C::OFF_Q, sdo = base + C::OFF_DO;
    const uint32_t spt = base + C::OFF_PT, sdst = base + C::OFF_DST, sds = base + C::OFF_DS;
    unsigned char *const stage = smem + C::OFF_ST;
    float *const sL = reinterpret_cast<float *>(smem + C::OFF_L);  // [2][BM] lse2
    float *const sDl = sL + 2 * BM;                                 // [2][BM] delta
    const uint32_t q_full = base + C::OFF_BAR;                      // [2]
    const uint32_t q_empty = q_full + 16;                           // [2]
    const uint32_t do_full = q_empty + 16, do_empty = do_full + 8, pds_free = do_empty + 8;
    const uint32_t st_full = pds_free + 8;   // [2]
    const uint32_t st_empty = st_full + 16;  // [2]

    const int nq = a.nq, nk = a.nk;
    const int nqt = a.group * nq;  // flattened query tiles x = (h - h0) * nq + query tile
    const int jt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int h0 = hk * a.group;
    const int64_t bh = static_cast<int64_t>(b) * a.H + h0;
    const int seg = jt / a.seg_size, seg_pos = jt % a.seg_size;
    const int seg_len = min(a.seg_size, nk - seg * a.seg_size);
    const bool ordered = a.mode == taca_bwd::kOrdered;
    const int soff = a.skew ? (nqt - jt % nqt) % nqt : 0;  // the skew (v6 item 10)
    int *sem_row = a.sem + (seg * static_cast<int64_t>(a.B) * a.H + bh) * nq;
    float *acc_base = a.dq_acc + (seg * static_cast<int64_t>(a.B) * a.H + bh) * a.Np * C::ACC_LD;
    // TRACE: this CTA's slots (the first kTraceCtas CTAs), else null
    [[maybe_unused]] unsigned long long *trace = nullptr;
    if constexpr (TRACE) {
        const int cid = jt + nk * (hk + gridDim.y * b);
        if (cid < kTraceCtas) trace = g_trace256 + static_cast<size_t>(cid) * kTraceSlots;
        if (trace && threadIdx.x == 0) {
            atomicAdd(trace + 0, static_cast<unsigned long long>(trace_smid()));
            atomicAdd(trace + 1, trace_ns());
            atomicAdd(trace + 3, static_cast<unsigned long long>(jt) | (static_cast<unsigned long long>(seg_pos) << 16) |
                                     (static_cast<unsigned long long>(seg) << 24) |
                                     (static_cast<unsigned long long>(hk) << 32) |
                                     (static_cast<unsigned long long>(b) << 48));
            atomicAdd(trace + 5, static_cast<unsigned long long>(nqt));
        }
    }

    if (threadIdx.x == 0) {
        for (int s = 0; s < 2; ++s) {
            mbar_init(q_full + 8 * s, 33);    // every producer lane after its lse2 / delta stores, + the expect_tx
            mbar_init(q_empty + 8 * s, 256);  // every MMA thread after its last read of the tile (dK)
            mbar_init(st_full + 8 * s, 128);  // the warpgroup's threads after their staging stores
            mbar_init(st_empty + 8 * s, 32);  // the writer's lanes once the copy engine read the slice
        }
        mbar_init(do_full, 1);     // the producer's expect_tx
        mbar_init(do_empty, 256);  // every MMA thread after its dV product
        mbar_init(pds_free, 256);  // every MMA thread after its products that read P^T, dS'^T, dS'
        mbar_init_fence();
    }
    __syncthreads();
    if (threadIdx.x >= 256) setmaxnreg_dec<24>();
    if (threadIdx.x >= 256 && threadIdx.x < 288) {
        // Producer: Q of step it into ring slot it & 1 (once both warpgroups released step it - 2), lse2 / delta with
        // it; then dO of step it into its one buffer (once both warpgroups' dV products of step it - 1 completed).
        const int pl = threadIdx.x - 256;
        const float *lse2b = a.lse2 + bh * a.Np;
        const float *deltab = a.delta + bh * a.Np;
        [[maybe_unused]] unsigned long long *const trp = TRACE && pl == 0 && trace ? trace + kTrProducer : nullptr;
        [[maybe_unused]] uint32_t tc = 0;
        if (pl == 0) {
            if (a.dq_overlap) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
            tma_prefetch_desc(&p.tq);
            tma_prefetch_desc(&p.tdo);
        }
        for (int it = 0; it < nqt; ++it) {
            const int buf = it & 1;
            const int x = taca_bwd::skew_tile(it, soff, nqt);
            if constexpr (TRACE) tc = trace_clock();
            if (it >= 2) mbar_wait(q_empty + 8 * buf, ((it >> 1) - 1) & 1);
            if constexpr (TRACE) trace_lap(trp, tc);
            {  // lanes 0..15 lse2, 16..31 delta: one float4 each (BM = 64)
                const float4 v = reinterpret_cast<const float4 *>((pl < 16 ? lse2b : deltab) + x * BM)[pl & 15];
                const uint32_t dst = smem_u32((pl < 16 ? sL : sDl) + buf * BM) + 16 * (pl & 15);
                asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "f"(v.x), "f"(v.y), "f"(v.z),
                             "f"(v.w)
                             : "memory");
            }
            mbar_arrive(q_full + 8 * buf);  // every lane after its own stores (racecheck does not model __syncwarp)
            const int hh = x / nq;
            const int i0 = (x - hh * nq) * BM, h = h0 + hh;
            if (pl == 0) {
                mbar_arrive_expect_tx(q_full + 8 * buf, C::QT_BYTES);
                tma_load_tile<DP, BM>(sq + buf * C::QT_BYTES, &p.tq, p.pos_q, q_full + 8 * buf, i0, h, b);
                if constexpr (TRACE) tc = trace_clock();
                if (it >= 1) mbar_wait(do_empty, (it - 1) & 1);
                if constexpr (TRACE) trace_lap(trp ? trp + 1 : nullptr, tc);
                mbar_arrive_expect_tx(do_full, C::QT_BYTES);
                tma_load_tile<DP, BM>(sdo, &p.tdo, p.pos_do, do_full, i0, h, b);
            }
        }
        return;
    }
    if (threadIdx.x >= 288) {
        // dQ writers: warp 9 + w adds warpgroup w's column half [128 w, 128 w + 128) of every tile, two 64-column
        // slices a tile through staging buffer w. Per tile: poll the chain predecessor's release, add (the chain's
        // first link: store) each slice by two 2-D TMA tensor operations and free the buffer once read; then wait for
        // the writes, meet the other writer, and writer 0 releases the tile.
        if (threadIdx.x >= 352) return;
        const int w = (threadIdx.x - 288) >> 5, wl = threadIdx.x & 31;
        const int chain0 = seg * a.seg_size;
        float *accb = ordered ? acc_base : a.dq_acc + bh * a.Np * C::ACC_LD;
        const int row0 = static_cast<int>((accb - a.dq_acc) / DP);
        const uint32_t src = smem_u32(stage + w * C::STAGE_BYTES);
        const bool skip = a.mode == taca_bwd::kSkip;  // (a timing mode: no dQ written at all)
        [[maybe_unused]] unsigned long long *const trw =
            TRACE && wl == 0 && trace ? trace + kTrWriter + 5 * w : nullptr;
        [[maybe_unused]] uint32_t tc = 0;
        if (wl == 0) tma_prefetch_desc(&p.tacc);
        for (int it = 0; it < nqt; ++it) {
            const int x = taca_bwd::skew_tile(it, soff, nqt);
            const int rank = taca_bwd::skew_rank(x, seg_pos, seg_len, chain0, nqt, a.skew != 0);
            const bool first = ordered ? rank == 0 : a.mode == taca_bwd::kRacy;
            const bool releases = ordered ? (a.dq_overlap || rank < seg_len - 1) : a.dq_overlap != 0;
            if (ordered && rank > 0) {
                if constexpr (TRACE) tc = trace_clock();
                if (wl == 0)
                    while (taca_bwd::ld_acquire(sem_row + x) < rank) {
                    }
                if constexpr (TRACE) trace_lap(trw, tc);
                __syncwarp();
                asm volatile("fence.proxy.async.global;\n" ::: "memory");
            }
#pragma unroll 1
            for (int s = 0; s < 2; ++s) {
                const int k = 2 * it + s;  // this buffer's k-th slice
                if constexpr (TRACE) tc = trace_clock();
                mbar_wait(st_full + 8 * w, k & 1);
                if constexpr (TRACE) trace_lap(trw ? trw + 1 : nullptr, tc);
                if (wl == 0 && !skip) {
#pragma unroll
                    for (int cb = 0; cb < 2; ++cb) {
                        const int col = 128 * w + 64 * s + 32 * cb;
                        if (first) taca_bwd90::tma_store_2d(&p.tacc, src + cb * BM * 128, col, row0 + x * BM);
                        else taca_bwd90::tma_add_2d(&p.tacc, src + cb * BM * 128, col, row0 + x * BM);
                    }
                    bulk_commit();
                    bulk_wait_read();
                }
                if constexpr (TRACE) trace_lap(trw ? trw + 2 : nullptr, tc);
                __syncwarp();
                mbar_arrive(st_empty + 8 * w);  // the buffer is free again
            }
            if (releases) {
                if constexpr (TRACE) tc = trace_clock();
                if (wl == 0) {
                    bulk_wait_write();  // this half added (+ proxy fence)
                    __threadfence();
                }
                named_bar_sync(BAR_WR, 64);  // both halves added
                if (w == 0 && wl == 0) {
                    if (ordered) taca_bwd::st_release(sem_row + x, rank + 1);
                    else taca_bwd::red_release_add(sem_row + x, 1);
                }
                if constexpr (TRACE) trace_lap(trw ? trw + 3 : nullptr, tc);
            }
        }
        bulk_wait_write();  // the CTA may not end before its bulk operations did
        if constexpr (TRACE)
            if (trw) atomicAdd(trw + 4, trace_ns());
        return;
    }
    setmaxnreg_inc<240>();

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = jt * BN;
    const int N = a.N, Nk = a.Nk, D = a.D;
    // MASK: a mask (its own instance); a key mask the same for every query row and head of the group whose 64 keys
    // here all attend takes the unmasked paths (v6's rule)
    const bool masked = MASK && !(a.mask.q == 0 && (a.mask.h == 0 || a.group == 1) &&
                                  keys_attend<BN>(a.mask, b * a.mask.b + h0 * a.mask.h, j0, Nk, lane));
    const float gam = a.gamma[b];
    const float grev = a.gamma_reverse;
    const float lg = a.scale * taca_bwd::kLog2e;
    const T *kb = static_cast<const T *>(a.k) + b * a.ks_b + hk * a.ks_h;
    const T *vb = static_cast<const T *>(a.v) + b * a.vs_b + hk * a.vs_h;

    // K and V once (keys past Nk, columns past D: zero)
    load_tile_sw128<T, BN, DP, 256>(sk, kb, a.ks_n, j0, Nk, D, tid);
    load_tile_sw128<T, BN, DP, 256>(sv, vb, a.vs_n, j0, Nk, D, tid);
    cp_async_commit();
    if (tid == 0) {
        const Span sp = span_of(a.spans, b, a.text_begin, a.text_end, a.q_text_begin, a.q_text_end);
        s_span[0] = sp.kb;
        s_span[1] = sp.ke;
        s_span[2] = sp.qb;
        s_span[3] = sp.qe;
    }
    float dv[64], dk[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) dv[i] = dk[i] = 0.f;
    const int kr0 = j0 + 16 * warp + g, kr1 = kr0 + 8;  // this thread's keys (rows of S^T)
    const uint64_t d_k = desc_sw128(sk), d_v = desc_sw128(sv);
    const uint64_t d_pt = desc_sw128(spt), d_dst = desc_sw128(sdst), d_ds = desc_sw128(sds);
    unsigned char *const my_stage = stage + wg * C::STAGE_BYTES;
    cp_async_wait<0>();
    fence_proxy_async();
    named_bar_sync(BAR_MMA, 256);  // K, V, the span visible to both warpgroups and to wgmma
    const int ksb = s_span[0], kse = s_span[1], qsb = s_span[2], qse = s_span[3];
    const bool kt0 = kr0 >= ksb && kr0 < kse, kt1 = kr1 >= ksb && kr1 < kse;
    // m is uniform over the CTA's 64 keys where they are all text or all visual
    const bool k_uniform = j0 + BN <= ksb || j0 >= kse || (j0 >= ksb && j0 + BN <= kse);
    const bool k_text = j0 >= ksb && j0 < kse;
    // TRACE: MMA thread 0 adds each segment's cycles to its slot (lap: the segment ends here)
    [[maybe_unused]] unsigned long long *const trm = TRACE && tid == 0 && trace ? trace + kTrSeg : nullptr;
    [[maybe_unused]] uint32_t tc = 0, tc_start = 0;
    if constexpr (TRACE) {
        if (trm) atomicAdd(trace + kTrLoopStart, trace_ns());
        tc = tc_start = trace_clock();
    }
#define D256_LAP(seg)                                                    \
    do {                                                                 \
        if constexpr (TRACE) trace_lap(trm ? trm + (seg) : nullptr, tc); \
    } while (0)

    for (int it = 0; it < nqt; ++it) {
        const int buf = it & 1;
        const int x = taca_bwd::skew_tile(it, soff, nqt);
        const int hh = x / nq;
        const int i0 = (x - hh * nq) * BM;
        const uint32_t qt = sq + buf * C::QT_BYTES;
        mbar_wait(q_full + 8 * buf, (it >> 1) & 1);  // Q, lse2, delta of step it landed
        D256_LAP(kSegQ);
        float s[16], dp[16];
        const uint64_t d_qw = desc_sw128(qt + wg * 32 * 128), d_dow = desc_sw128(sdo + wg * 32 * 128);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk)
            wgmma_ss<T, 32, 0, 0>(s, desc_advance(d_k, (kk >> 2) * BN * 128 + (kk & 3) * 32),
                                  desc_advance(d_qw, (kk >> 2) * BM * 128 + (kk & 3) * 32), kk > 0);
        wgmma_commit();
        D256_LAP(kSegS);
        mbar_wait(do_full, it & 1);  // dO of step it landed
        D256_LAP(kSegDo);
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk)
            wgmma_ss<T, 32, 0, 0>(dp, desc_advance(d_v, (kk >> 2) * BN * 128 + (kk & 3) * 32),
                                  desc_advance(d_dow, (kk >> 2) * BM * 128 + (kk & 3) * 32), kk > 0);
        wgmma_commit();
        wgmma_wait<1>();
        fence_regs<16>(s);
        D256_LAP(kSegDp);

        // P^T = exp2(S^T lg m - lse2) for this warpgroup's queries qw0 + 8 nt + 2t (+1), keys kr0 / kr1 (v6's math)
        const int qw0 = i0 + 32 * wg;
        const float *lrow = sL + buf * BM + 32 * wg;
        const float *drow = sDl + buf * BM + 32 * wg;
        const bool q_uniform = qw0 + 32 <= qsb || qw0 >= qse || (qw0 >= qsb && qw0 + 32 <= qse);
        const bool uniform = !masked && k_uniform && q_uniform;
        const bool q_text = qw0 >= qsb && qw0 < qse;
        const float mu = (k_text == q_text) ? 1.f : (q_text ? grev : gam);
        // element (nt, e) of the S^T fragment: query qw0 + 8 nt + 2t + (e & 1), key e < 2 ? kr0 : kr1; its gamma
        // factor m (query text span x key text span), and with a mask its log2(e) term (-inf outside N x Nk)
        auto m_at = [&](int nt, int e) -> float {
            const int qi = qw0 + nt * 8 + 2 * t + (e & 1);
            const bool qtx = qi >= qsb && qi < qse;
            const bool ktx = (e < 2) ? kt0 : kt1;
            return (qtx == ktx) ? 1.f : (qtx ? grev : gam);
        };
        if (uniform) {
            const float cf = lg * mu;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt * 4 + e] = fast_exp2(s[nt * 4 + e] * cf - ((e & 1) ? l2.y : l2.x));
            }
        } else if (!masked) {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    s[nt * 4 + e] = fast_exp2(s[nt * 4 + e] * (lg * m_at(nt, e)) - ((e & 1) ? l2.y : l2.x));
            }
        } else {
            // a key mask (mask.q == 0): the thread's two keys' terms, read once per query tile (v6's path); any other
            // mask: per element (key row kr, query column qi, offsets mo0 / mo1 of (qw0 + 2t, kr0 / kr1))
            const float2 mk = a.mask_keys ? key_mask_terms(a.mask, b * a.mask.b + (h0 + hh) * a.mask.h, kr0, Nk)
                                          : make_float2(0.f, 0.f);
            const int64_t mo0 = b * a.mask.b + (h0 + hh) * a.mask.h + static_cast<int64_t>(qw0 + 2 * t) * a.mask.q +
                                static_cast<int64_t>(kr0) * a.mask.k;
            const int64_t mo1 = mo0 + 8 * a.mask.k;
            const bool kin0 = kr0 < Nk, kin1 = kr1 < Nk;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const float2 l2 = *reinterpret_cast<const float2 *>(lrow + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = qw0 + nt * 8 + 2 * t + (e & 1);
                    const bool kin = (e < 2) ? kin0 : kin1;
                    const float mt = qi >= N        ? -INFINITY
                                     : a.mask_keys ? ((e < 2) ? mk.x : mk.y)
                                     : kin         ? mask_log2(a.mask, (e < 2) ? mo0 : mo1, nt * 8 + (e & 1), 0)
                                                   : -INFINITY;
                    s[nt * 4 + e] = fast_exp2(s[nt * 4 + e] * (lg * m_at(nt, e)) + mt - ((e & 1) ? l2.y : l2.x));
                }
            }
        }
        // P^T packed (RS A-fragment order, 16 queries a block) and stored once the previous tile's products read
        // the three buffers
        // a 16 x 16 block's 8 accumulators (8-column groups 2 kk, 2 kk + 1) as 4 packed pairs
        auto pack_block = [](const float *x, uint32_t (&o)[4]) {
#pragma unroll
            for (int i = 0; i < 4; ++i) o[i] = pack2<T>(x[2 * i], x[2 * i + 1]);
        };
        uint32_t pa[2][4], da[2][4];
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) pack_block(s + 8 * kk, pa[kk]);
        D256_LAP(kSegExp);
        if (it > 0) mbar_wait(pds_free, (it - 1) & 1);
        D256_LAP(kSegPds);
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) store_block<BN>(spt, pa[kk], 16 * warp, 32 * wg + 16 * kk, lane);
        if constexpr (OWN) {
            // OWN: dV += P^T dO over this warpgroup's own 32 queries now, A = P^T from its registers (the
            // exponentials' RS A fragments), while the other warpgroup still makes its half
            const uint64_t d_do_own = desc_sw128_mn(sdo + 2 * wg * BM * 128, BM * 128);
            fence_regs<64>(dv);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 2; ++kk)
                wgmma_rs<T, 128, 1>(dv, pa[kk], desc_advance(d_do_own, (2 * wg + kk) * 16 * 128), 1);
            wgmma_commit();
            wgmma_wait<1>();  // dP^T done (dV's own half may run)
        } else {
            wgmma_wait<0>();
        }
        fence_regs<16>(dp);
        D256_LAP(kSegPst);
        // dS'^T = P^T (dP^T - delta) m
        if (uniform) {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const float2 dl = *reinterpret_cast<const float2 *>(drow + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dp[nt * 4 + e] = s[nt * 4 + e] * (dp[nt * 4 + e] - ((e & 1) ? dl.y : dl.x)) * mu;
            }
        } else {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const float2 dl = *reinterpret_cast<const float2 *>(drow + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dp[nt * 4 + e] = s[nt * 4 + e] * (dp[nt * 4 + e] - ((e & 1) ? dl.y : dl.x)) * m_at(nt, e);
            }
        }
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            pack_block(dp + 8 * kk, da[kk]);
            store_block<BN>(sdst, da[kk], 16 * warp, 32 * wg + 16 * kk, lane);        // dS'^T [keys][queries]
            store_block_trans<BM>(sds, da[kk], 16 * warp, 32 * wg + 16 * kk, lane);  // dS' [queries][keys]
        }
        if constexpr (OWN) {  // dK += dS'^T Q over the own 32 queries, A = dS'^T from registers
            const uint64_t d_q_own = desc_sw128_mn(qt + 2 * wg * BM * 128, BM * 128);
            fence_regs<64>(dk);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 2; ++kk)
                wgmma_rs<T, 128, 1>(dk, da[kk], desc_advance(d_q_own, (2 * wg + kk) * 16 * 128), 1);
            wgmma_commit();
        }
        fence_proxy_async();           // the stmatrix writes -> the wgmma reads after the barrier
        D256_LAP(kSegDs);
        named_bar_sync(BAR_MMA, 256);  // P^T, dS'^T, dS' complete (both warpgroups' halves)
        D256_LAP(kSegBar);

        // dV += P^T dO, dQ slice 0 = dS' K, dK += dS'^T Q over this warpgroup's 128 columns (OWN: the other
        // warpgroup's 32 queries of dV and dK, the own ones being in flight already)
        const uint64_t d_do_mn = desc_sw128_mn(sdo + 2 * wg * BM * 128, BM * 128);
        const uint64_t d_q_mn = desc_sw128_mn(qt + 2 * wg * BM * 128, BM * 128);
        const uint64_t d_kq = desc_sw128(sk + 2 * wg * BN * 128);
        constexpr int nkq = OWN ? 2 : BM / 16;  // the query k-steps read from P^T / dS'^T here, from kqb
        const int kqb = OWN ? 2 * (1 - wg) : 0;  // (OWN: the other warpgroup's two)
        float dq[32];
        if constexpr (!OWN) {  // (OWN: dV and dK are accumulators of wgmmas in flight: not touched here)
            fence_regs<64>(dv);
            fence_regs<64>(dk);
        }
        wgmma_fence();
#pragma unroll
        for (int i = 0; i < nkq; ++i)
            wgmma_ss<T, 128, 0, 1>(dv, desc_advance(d_pt, (kqb + i) * 32), desc_advance(d_do_mn, (kqb + i) * 16 * 128),
                                   1);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            wgmma_ss<T, 64, 0, 1>(dq, desc_advance(d_ds, kk * 32), desc_advance(d_kq, kk * 16 * 128), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int i = 0; i < nkq; ++i)
            wgmma_ss<T, 128, 0, 1>(dk, desc_advance(d_dst, (kqb + i) * 32), desc_advance(d_q_mn, (kqb + i) * 16 * 128),
                                   1);
        wgmma_commit();
        wgmma_wait<1>();  // dV and dQ slice 0 done (OWN: and dK's own half), dK running
        fence_regs<64>(dv);
        fence_regs<32>(dq);
        if constexpr (OWN) {  // the RS products' A fragments stay untouched until they completed
            fence_regs<8>(&pa[0][0]);
            fence_regs<8>(&da[0][0]);
        }
        mbar_arrive(do_empty);  // dO of step it read (dP^T and dV)
        D256_LAP(kSegMma);
        // slice 0 into the warpgroup's staging buffer (free once the writer read the previous slice, 2 it - 1)
        if (it > 0) mbar_wait(st_empty + 8 * wg, (2 * it - 1) & 1);
        D256_LAP(kSegE0);
        stage_slice(my_stage, dq, warp, g, t, st_full + 8 * wg);
        D256_LAP(kSegSt0);
        // slice 1: columns 128 wg + 64 ..
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            wgmma_ss<T, 64, 0, 1>(dq, desc_advance(d_ds, kk * 32), desc_advance(d_kq, BN * 128 + kk * 16 * 128),
                                  kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs<64>(dk);
        fence_regs<32>(dq);
        mbar_arrive(q_empty + 8 * buf);  // Q, lse2, delta of step it read
        mbar_arrive(pds_free);           // P^T, dS'^T, dS' read by this warpgroup's products
        D256_LAP(kSegDq1);
        mbar_wait(st_empty + 8 * wg, (2 * it) & 1);  // slice 2 it read by the writer
        D256_LAP(kSegE1);
        stage_slice(my_stage, dq, warp, g, t, st_full + 8 * wg);
        D256_LAP(kSegSt1);
    }
#undef D256_LAP
    if constexpr (TRACE)
        if (trm) {
            atomicAdd(trace + 2, trace_ns());
            atomicAdd(trace + 4, static_cast<unsigned long long>(trace_clock() - tc_start));
        }
    // dK = scale * dK', dV of key/value head hk: rows kr0, kr1, columns 128 wg ..
    taca_bwd::store_dk_dv<T, 16>(a, b, hk, Nk, D, kr0, kr1, 128 * wg, t, dk, dv);
#else
    (void)p;
#endif
}

template <typename T>
int launch(const BwdArgs &a0, cudaStream_t stream) {
    using C = Cfg;
    // TACA_BWD_D256_TRACE=1: the trace instance (diagnostic; calls with a mask run the plain masked one);
    // TACA_BWD_D256_OWN=1: dV / dK's own half of the queries from registers before the warpgroups' barrier (opt-in)
    const char *tr = getenv("TACA_BWD_D256_TRACE");
    const char *own = getenv("TACA_BWD_D256_OWN");
    const bool trace = !a0.mask.data && tr && !strcmp(tr, "1"), oh = own && !strcmp(own, "1");
    auto kernel = oh ? (a0.mask.data ? taca_bwd_sm90_d256_kernel<T, true, false, true>
                        : trace      ? taca_bwd_sm90_d256_kernel<T, false, true, true>
                                     : taca_bwd_sm90_d256_kernel<T, false, false, true>)
                     : (a0.mask.data ? taca_bwd_sm90_d256_kernel<T, true, false, false>
                        : trace      ? taca_bwd_sm90_d256_kernel<T, false, true, false>
                                     : taca_bwd_sm90_d256_kernel<T, false, false, false>);
    cudaFuncAttributes attr;
    TACA_CUDA_TRY(cudaFuncGetAttributes(&attr, kernel), "taca_bwd_cuda (sm90 d256): cudaFuncGetAttributes");
    if (attr.binaryVersion != 90) return TACA_ERR_UNSUPPORTED;
    D256Args p;
    memset(&p, 0, sizeof(p));
    p.a = a0;
    BwdArgs &a = p.a;
    // The workspace (taca_bwd.cu layout_of) counts 32-row query tiles and 128-key tiles at D = 256; this kernel's
    // tiles are 64 x 64: rows (Np) are rounded up to 64 there, the chains re-counted in 64-key tiles here (each chain
    // twice as many tiles: never more chains, so never more dQ buffers or counters than the workspace holds).
    if (a.Np % C::BM != 0) return TACA_ERR_UNSUPPORTED;  // (the layout rounds to 64 when the switch is read alike)
    a.nq = a.Np / C::BM;
    a.nk = (a.Nk + C::BN - 1) / C::BN;
    a.seg_size *= 2;
    a.nseg = (a.nk + a.seg_size - 1) / a.seg_size;
    a.chain_len *= 2;
    a.acc_ld = C::ACC_LD;
    {
        int sms = 0;
        if (device_sm_count(&sms, "taca_bwd_cuda (sm90 d256): SM count") != TACA_OK) sms = 0;
        taca_bwd::apply_skew_rule(&a, sms);
    }
    if (!encode_map<T>(&p.tq, p.pos_q, a.q, a.qs_n, a.qs_h, a.qs_b, a.N, a.H, a.B, a.D, C::BM) ||
        !encode_map<T>(&p.tdo, p.pos_do, a.dout, a.dos_n, a.dos_h, a.dos_b, a.N, a.H, a.B, a.D, C::BM))
        return TACA_ERR_UNSUPPORTED;
    const int64_t rows = static_cast<int64_t>(a.nseg) * a.B * a.H * a.Np;
    if (rows > INT32_MAX || !encode_acc_map(&p.tacc, a.dq_acc, rows, C::DP, C::BM)) return TACA_ERR_UNSUPPORTED;
    TACA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM),
                  "taca_bwd_cuda (sm90 d256): cudaFuncSetAttribute");
    int st = taca_bwd::launch_preprocess<T, C::DP>(a, stream, "taca_bwd_cuda (sm90 d256) preprocess");
    if (st != TACA_OK) return st;
    if (a.mode == taca_bwd::kAtomic) {
        const size_t bytes = static_cast<size_t>(a.nseg) * a.B * a.H * a.Np * C::ACC_LD * sizeof(float);
        TACA_CUDA_TRY(cudaMemsetAsync(a.dq_acc, 0, bytes, stream), "taca_bwd_cuda (sm90 d256) memset dq_acc");
    }
    kernel<<<dim3(a.nk, a.Hkv, a.B), C::THREADS, C::SMEM, stream>>>(p);
    st = taca_cuda_check_launch("taca_bwd_cuda (sm90 d256) main");
    if (st != TACA_OK) return st;
    // the conversion as the main kernel's programmatic dependent (v6 item 7)
    return taca_bwd::launch_dq_convert_after<T, C::DP, C::BM>(a, stream, "taca_bwd_cuda (sm90 d256) dq convert",
                                                             "taca_bwd_cuda (sm90 d256) dq convert (tiles)");
}

}  // namespace taca_bwd256

/* Whether this kernel may run (an sm_90a build, an sm_90 device, and the switch): taca_bwd.cu's workspace layout
 * rounds D = 256 rows to its 64-row tiles only then, so the mma.sync kernel's layout (and with it its skew's tile
 * walk) is unchanged where this one cannot run. */
bool taca_bwd_sm90_d256_enabled() {
#if defined(TACA_HAVE_SM90A)
    // Whether this kernel runs by default where it applies: off until compute-sanitizer has run it (tested and timed
    // on an H100 in the fiftieth session: KERNEL_LOG).
    // TACA_BWD_D256=wgmma / mma picks a kernel (a test and timing switch, read per call).
    constexpr bool kDefault = false;
    const char *e = getenv("TACA_BWD_D256");
    const bool on = e && !strcmp(e, "wgmma") ? true : e && !strcmp(e, "mma") ? false : kDefault;
    return on && taca_sm90::device_is_sm90("taca_bwd_cuda (sm90 d256): device query") == TACA_OK;
#else
    return false;
#endif
}

/* TACA_ERR_UNSUPPORTED where this kernel does not apply (the caller then runs the mma.sync kernel). */
int taca_bwd_sm90_d256(const taca_bwd::BwdArgs &a, cudaStream_t stream, bool bf16) {
#if defined(TACA_HAVE_SM90A)
    if (!taca_bwd_sm90_d256_enabled()) return TACA_ERR_UNSUPPORTED;  // (the device query too)
    if (a.D <= 128 || a.D > 256 || !a.vec_load || a.nk < 2) return TACA_ERR_UNSUPPORTED;
    if (static_cast<int64_t>(a.Hkv) > 65535 || a.B > 65535) return TACA_ERR_UNSUPPORTED;
    return bf16 ? taca_bwd256::launch<__nv_bfloat16>(a, stream) : taca_bwd256::launch<__half>(a, stream);
#else
    (void)a; (void)stream; (void)bf16;
    return TACA_ERR_UNSUPPORTED;
#endif
}

#if defined(TACA_HAVE_SM90A)
/* The trace instance's slots (TACA_BWD_D256_TRACE=1; see kTraceSlots above): bytes <= sizeof g_trace256 copied to dst
 * (host memory), or zeroed (before the launch to read). 0 on success, else the CUDA error. */
extern "C" int taca_bwd256_trace_read(void *dst, size_t bytes) {
    if (bytes > sizeof(taca_bwd256::g_trace256)) bytes = sizeof(taca_bwd256::g_trace256);
    return static_cast<int>(cudaMemcpyFromSymbol(dst, taca_bwd256::g_trace256, bytes));
}
extern "C" int taca_bwd256_trace_reset(void) {
    void *ptr = nullptr;
    cudaError_t e = cudaGetSymbolAddress(&ptr, taca_bwd256::g_trace256);
    if (e == cudaSuccess) e = cudaMemset(ptr, 0, sizeof(taca_bwd256::g_trace256));
    return static_cast<int>(e == cudaSuccess ? cudaDeviceSynchronize() : e);
}
#endif
