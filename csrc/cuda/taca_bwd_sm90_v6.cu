/*
 * taca_bwd_sm90_v6.cu: Hopper (sm_90a) backward main kernel, v6: the v5 kernel of
 * taca_bwd_sm90.cu (its header explains the math, the chains and the bulk dQ hand-off) with
 *   1. a producer warp (8): lane 0 loads each query tile's Q and dO by TMA (tensor maps, 128B
 *      swizzle by the copy engine, rows >= N and columns >= D zero-filled), the warp copies its
 *      lse2 / delta rows with ordinary loads and stores, into a two-deep ring gated by mbarriers:
 *      full (lse2 / delta stored, then the TMA bytes landed) and empty (every MMA thread after its
 *      warpgroup's last read of the tile). In v5 every MMA thread issued cp.async for the next
 *      tile (with its index math) and the two MMA warpgroups met at a CTA barrier at the top of
 *      every tile: an ncu profile of v5 on FLUX 1024 (KERNEL_LOG, "Backward v6") put 10% of the
 *      MMA warps' samples in that load issue and 6% in the wait + fence + barrier. Here a
 *      warpgroup waits on the full barrier only; the dS' tile is reused once the other
 *      warpgroup's dQ product of the previous tile completed (mbarrier ds_free), so the one CTA
 *      barrier left per tile is the one that publishes dS'.
 *   2. FlashAttention-3's GEMM order per query tile: dV = P^T dO is issued before the dS'
 *      barrier, dQ right after it and dK = dS'^T Q last, so the dQ part is staged for the writer
 *      while the tensor cores still run dK (v5 waited for all three, then staged).
 *   3. dQ staging rows padded by 32 B for the float2 stores (v5's 16 B gave 5.3-way bank
 *      conflicts on 38% of the shared-store wavefronts in that profile).
 *   4. Two dQ writer warps (9, 10), one per staging buffer, taking alternate query tiles: each
 *      polls the chain predecessor's release of its tile before the tile is staged, adds it with
 *      TMA bulk reduce-adds (one per row then; one per tile now, item 5), frees the buffer once
 *      read and releases the tile to the successor as soon as its writes completed
 *      (st.release.gpu). v5's writer warpgroup released tile it - 1 only after tile it was staged
 *      (a chain link lagged a whole tile) and met at a named barrier plus __threadfence per tile:
 *      1.665 -> 1.614 ms on FLUX 1024 b1 (H200).
 *   5. Two forms of the dQ writer (TACA_BWD_V6_WRITER, a timing switch): "rows" (item 4, rows padded
 *      by 32 B; the default at D = 72..128; the whole staged tile, padding included, is one contiguous
 *      block of the workspace (row stride ACC_LD = DP + kAccPad) added by ONE bulk reduce-add: a per-tile
 *      trace showed the 64 row operations taking ~3 us from staged to released, and each chain link
 *      waits for its predecessor's release, so link k ran k x 3.8 us behind the head; FLUX 1024 b1
 *      1.449 -> 1.406 ms, KERNEL_LOG twelfth session) and "tensor" (the staged
 *      tile in 128B-swizzled boxes of 32 fp32 columns x BM rows, dense, added by DP / 32 2-D TMA
 *      tensor reduce-adds from one lane; the default at D = 64). At D = 64 a tile is 128 rows, and
 *      the row writer's 128 operations per tile made the MMA warps wait for free staging buffers
 *      (19% of an ncu profile's samples): SD3.5-M bwd 2.01 -> 1.71 ms (v5: 1.81 before, 1.93 with
 *      the proxy fence below), which makes v6 the default at D = 64 too. At D = 128 the row writer
 *      is 5.3-5.7% faster (FLUX 1024 b1 / b2, across processes: KERNEL_LOG, fourteenth session).
 * The MMA threads issue fence.proxy.async.shared::cta after their generic stores to a staging
 * buffer and before announcing it: the copy engine (async proxy) reads it.
 * The ring's empty barrier takes an arrival from every MMA thread rather than lane 0 of each warp
 * after __syncwarp: compute-sanitizer racecheck does not model __syncwarp and reported the other
 * lanes' reads against the next tile's writes (tests/cuda_harness/bulkring_racecheck.cu shows
 * that alone: 1 hazard with lane-0 arrivals, 0 with every thread arriving; v6 now 0 hazards).
 *   A query tile of 80 rows at D = 128 (FA3's; dQ made transposed as dQ^T = K^T dS'^T with
 *   wgmma_ss TA = 1, one staging buffer for lack of shared memory) was measured slower than 64
 *   before the TMA producer (1.969 vs 1.724 ms, FLUX 1024 b1) and then needed more registers
 *   than 240 (ptxas serialized its wgmmas): dropped, see KERNEL_LOG "Backward v6".
 * Same math, preprocess, tiles (BM = 64 queries at D = 128, 128 at D = 64), workspace layout,
 * chains and dq conversion as v5, and the same fp32 operations in the same order: v6's gradients
 * equal v5's bitwise (bench_bwd_handoff.py, FLUX 1024 and SD3.5-M shapes, H200; tests). Falls
 * back (TACA_ERR_UNSUPPORTED) where a tensor map cannot be encoded (v5 then runs).
 *   6. dV += P^T dO and dK += dS'^T Q as one m64nDPk16 per k-step (dO and Q as 64-column blocks,
 *      desc_sw128_mn), not two m64n64: cuDNN's instruction mix (ncu) had them so; FLUX main kernel
 *      1382 -> 1342 us.
 *   7. The dQ conversion overlaps the main kernel's last wave (bwd_dq_convert_tiles, launched as
 *      its programmatic dependent; every CTA triggers it at its start, so it runs once all CTAs
 *      started, on the SMs the last wave leaves idle): the writers count finished tiles in sem
 *      (ordered: the chain's last link releases its tiles too; unordered: every CTA adds 1 per
 *      tile) and the conversion converts each tile once complete, in the same order (bitwise the
 *      same dq). H200, bwd alone: FLUX 1024 b1 1.470 -> 1.434 ms, b2 -1.7%, SD3.5-M -2.4%,
 *      SD3.5-L even (KERNEL_LOG, eleventh session). TACA_BWD_DQ_OVERLAP=0 converts after it.
 *   8. dK and dV can leave through shared memory: each warpgroup stages its 64 rows (stmatrix) into
 *      the K and V tiles, then one thread stores them by TMA (64 x 64 boxes; rows past Nk and columns
 *      past D clipped by the copy engine), not each thread's 4-byte stores from the fragments (8 rows x
 *      16 bytes per warp instruction) before the next CTA can start on the SM. The default: bwd alone
 *      FLUX 1024 b1 -1.8%, b2 -1.6%, SD3.5-M -1.2%, SD3.5-L -1.3% (deterministic; -1.3 to -2.1%
 *      unordered), one mode per process (KERNEL_LOG, fifteenth session). The epilogue reads every
 *      value it needs again (volatile), so nothing extra lives through the tile loop, and every
 *      kernel's loop compiles exactly as without it (a first form moved D = 128's loop and ran FLUX
 *      1.5-2% slower). TACA_BWD_V6_DKV=frag / tma forces one (a timing switch).
 *   9. A key mask (the same for every query row) adds each thread's two key terms, read once per
 *      query tile, not a byte load per element (taca_bwd.cu, BwdArgs::mask_keys).
 *  10. The skew: the CTA of key tile jt walks the flattened query tiles cyclically from (-jt) mod nqt,
 *      so chain link p + 1 reaches each tile one step (one tile's time) after link p, and a tile's
 *      chain order is the order of those visits: a rotation of the chain, rank (p - head) mod
 *      length, head = nqt - y where the visits wrap (y = (tile + chain's first key tile) mod nqt >
 *      nqt - length), else 0. Without it every link reached a tile at the same step and waited
 *      for its predecessor's release (a poll, then a 34 KB bulk reduce-add's completion: 2.3 us
 *      per link on FLUX 1024), so link k ran k x 2.3 us behind its chain's head and its MMA warps
 *      stalled on full staging buffers (trace, KERNEL_LOG twelfth session: CTA time +2.4 us per
 *      chain position). With it the handoff (~2 us) fits inside the one step each link has, and
 *      the window of tiles a head's CTAs read at once is the chain's length (a rotation by
 *      tiles / length per position, tried in the "Backward v6" entry, spread it over the whole
 *      head and lost). Still deterministic: each tile has one fixed order. Offsets follow the key
 *      tile (not its chain position), so dK / dV sum the query tiles in the same order with any
 *      chain count and in the unordered mode. Where it applies: taca_bwd::apply_skew_rule
 *      (taca_bwd_kernel.cuh; TACA_BWD_SKEW=0: off).
 *  11. Reads ahead (PF; D = 72..128 with the row writer, unmasked; D = 64 below): the text span is read into registers
 *      once before the tile loop, and each tile's lse2 / delta rows are loaded between the S / dP
 *      commits and their waits. The loop's wgmma fences (asm with memory clobbers) kept ptxas from
 *      hoisting them: the span's LDS + R2UR sat right after S's wait (3.5% of an ncu profile's stall
 *      samples, short scoreboard) and the first exp waited on its lse2 load (2.1%). The same values and
 *      operations (bitwise the same gradients); backward alone -0.6 to -1.7% on an H100 (KERNEL_LOG,
 *      thirty-fourth session). Masked instances keep the reads where used (ptxas spilled 8 bytes with
 *      them); TACA_BWD_V6_PF=0 forces that form (a timing switch). At D = 64 (the 1-D grid with the
 *      tensor writer) the span only: lse2 ahead took 32 registers at BM = 128 (12 bytes spilled).
 *  12. The tile index stepped on (IX, with PF): the MMA warps took each step's (head, query tile) as
 *      x / nq and its remainder, an integer division (I2F, MUFU.RCP, F2I and ~30 dependent integer
 *      ops, 4.8% of the profile's stall samples at the loop's top) between the previous tile's last
 *      wait and this tile's first wgmma, where neither warpgroup has tensor work queued; now they
 *      step (x, head, query tile) on at the loop's end. TACA_BWD_V6_IX=0: the division (a timing switch).
 *      Backward alone -1.1 to -1.9% at FLUX 1024 on an H100 (with the span ahead at D = 64: -0.5 to
 *      -2.7% at SD3.5 CFG; KERNEL_LOG, thirty-fifth session).
 *  13. dQ staged at the next tile (DS, with IX; more than one key tile, no mask; the default at D = 72..128
 *      with the row writer until item 16 took its place (TACA_BWD_V6_DF=0 gives it back), TACA_BWD_V6_DS=0 turns it
 *      off; at D = 64 with the tensor writer
 *      TACA_BWD_V6_DS=1 turns it on, slower there: +2.0% at SD3.5-M CFG): tile it's
 *      dQ part is kept in 32 registers and staged at tile it + 1 between the S commit and dP's issue
 *      (while S runs), so tile it ends with one wait for dV, dQ and dK instead of waiting for dQ,
 *      staging while dK runs (the profile's 6.3% dQ wait and 9.5% staging phases), then waiting for
 *      dK. Staged before dP's issue: with dQ's registers live beside S's, dP's, dK's and dV's
 *      accumulators ptxas serialized the wgmmas (C7512) and spilled 384 bytes. The same values in
 *      the same staging order: bitwise the same gradients (test_sm90_v6_dq_staged_next_tile).
 *      As compiled, ptxas injects a wait for S's wgmmas before the staging (C7517: it reads registers a wgmma
 *      defined), so a tile runs S, that wait, the staging, then dP's issue; with the wait removed (the part kept
 *      through an XOR with a zero ptxas cannot prove) the staging overlapped S and the backward ran 5% slower
 *      (shared memory is as busy as the tensor pipe in this loop; KERNEL_LOG, thirty-seventh session).
 *  16. dQ's product at the next tile (DF; with IX, in DS's place: D = 72..128 with the row writer, more than one key
 *      tile, no mask; TACA_BWD_V6_DF=0 gives DS; items 14 and 15 were switches measured slower and removed): tile it's
 *      dQ product (both warpgroups' dS' halves x K) is issued at tile it + 1 after S, waited with it and staged
 *      there, so the loop has no CTA barrier left: a warpgroup publishes its dS' half by an mbarrier (ds_full, every
 *      MMA thread after its stores and proxy fence) and goes on to dK. The one per-tile CTA barrier had kept the two
 *      warpgroups in step, their exponentials and dS' phases at the same time with the tensor cores idle; now one
 *      may lead the other by up to about half a tile (a warpgroup's dS' store waits for the other's dQ product of
 *      the previous tile, ds_free; its dQ product waits for the other's dS', ds_full), and the tensor cores take the
 *      other's products during one's exponentials. cuDNN's backward kernel (64x64x128_1x4x1) runs one MMA
 *      warpgroup per CTA, whose CTAs drift freely. The same products of the same operands staged in the same order:
 *      bitwise the same gradients. Backward alone on an H100, three rounds one mode per process: FLUX 1024 b1 1.348
 *      -> 1.290 ms, b2 2.730 -> 2.607, FLUX 2048 16.94 -> 16.12 (-4.3 / -4.5 / -4.8%; KERNEL_LOG, thirty-ninth
 *      session). Warpgroup 1 starting after warpgroup 0's first exponentials (BAR_LEAD) or with it
 *      (TACA_BWD_V6_DFLEAD=0) made no difference: they drift apart on their own. In DF every producer lane arrives
 *      on q_full after its own lse2 / delta stores (racecheck does not model __syncwarp, and without the loop's CTA
 *      barrier it reported them against the MMA threads' reads).
 *  17. D2 (D = 64 with DF, a switch: TACA_BWD_V6_D2=1; more than one key tile, no mask): two dS' buffers, tile it's
 *      in buffer it & 1, each with its own ds_full / ds_free, so that a warpgroup's dS' store waits for tile it - 2's
 *      dQ products, not it - 1's (FlashAttention-3's two dS stages at head dim 64). It did not fit beside the two
 *      32 KiB staging buffers by 80 bytes; it does with the span words in dynamic shared memory (no static shared
 *      memory) declared 128-byte aligned, so that the 1024-byte alignment of the base costs at most 896 bytes (see
 *      Cfg). The same products of the same operands staged in the same order: bitwise the default's gradients
 *      (test_sm90_v6_two_ds_buffers). Every other instance compiles to the same SASS as before it.
 * The default wherever it applies (taca_bwd.cu): FLUX 1024 b1 bwd 1.52 vs v5's 1.75 ms, SD3.5-M
 * cfg 1.65 vs 1.85 ms on an H200 (with the preprocess and conversion of taca_bwd_kernel.cuh).
 * KERNEL_LOG "Backward v6" and the entries after it have the runs, the profiles and what was tried
 * and dropped (an 80-row tile, a rotated chain schedule, the next tile's S issued during dK, dK
 * from shared memory, a relaxed poll, one warpgroup making a tile's whole dQ (twice: over its own keys,
 * and over all 128 alternating by tile), the DS staging in S's shadow without ptxas's injected wait (+5%), D = 64's
 * staging without bank conflicts (+1.9%) and half of a uniform tile's exps by a polynomial on the FMA pipe
 * (+0.4% at D = 128, +4% at D = 64), and, with deterministic=False, dQ added by the MMA threads' own
 * red.global.add.v2.f32 instead of the staging and the writers' bulk reduce-add (+22 to +27%; thirty-eighth session),
 * none faster).
 */
#include <stdlib.h>
#include <string.h>

#include "taca_bwd_kernel.cuh"
#include "taca_bwd_sm90.cuh"
#include "taca_sm90.cuh"

namespace taca_bwd96 {

using namespace taca_cuda;
using namespace taca_sm90;
using namespace taca_wgmma;
using taca_bwd::BwdArgs;
using taca_bwd90::bulk_add_f32;
using taca_bwd90::bulk_commit;
using taca_bwd90::bulk_store;
using taca_bwd90::bulk_wait_read;
using taca_bwd90::bulk_wait_write;
using taca_bwd90::encode_acc_map;
using taca_bwd90::store_block_trans;

/* TW: the writer adds a staged dQ tile with 2-D TMA tensor reduce-adds (DP / 32 per tile, staging in
 * 128B-swizzled 32-column boxes) instead of one bulk reduce-add of the padded rows (32 B per row). */
/* D2 (D = 64 with DF): two dS' buffers, tile ti's in buffer ti & 1, so that a warpgroup stores tile it's dS' once both
 * warpgroups' dQ products read tile it - 2's (not it - 1's): FlashAttention-3's two dS stages. It fits in 227 KiB
 * because its span words move into dynamic shared memory (no static shared memory) declared 128-byte aligned, so
 * the 1024-byte alignment of the base costs at most 896 bytes, not 1024. */
template <int DP_, int BM_, bool TW = false, bool D2 = false>
struct Cfg {
    static constexpr int DP = DP_;
    static constexpr int BM = BM_;                  // queries per tile
    static constexpr int BN = 128;                  // keys per CTA
    static constexpr int THREADS = 384;             // 2 MMA warpgroups, the producer warp, 2 writer warps, 1 idle
    static constexpr int NSTAGE = 2;                // dQ staging buffers (one per writer warp)
    static constexpr uint32_t KV_BYTES = BN * DP * 2;
    static constexpr uint32_t QT_BYTES = BM * DP * 2;  // one Q or one dO buffer
    static constexpr uint32_t DS_BYTES = BM * BN * 2;
    // dQ staging row (fp32, !TW), padded for float2 stores by the workspace rows' padding
    static constexpr uint32_t SROW = (DP + taca_bwd::kAccPad) * 4;
    static constexpr uint32_t STAGE_BYTES = TW ? BM * DP * 4 : BM * SROW;  // TW: [DP / 32][BM][128 B]
    // dq_acc's row stride in floats: the row writer's staged tile (rows of SROW bytes, padding
    // included) is one contiguous block of the workspace, added by one bulk operation
    static constexpr int ACC_LD = TW ? DP : DP + taca_bwd::kAccPad;
    static constexpr uint32_t TILE_TX = 2 * QT_BYTES;  // TMA bytes of a tile: Q and dO
    static constexpr int NDS = D2 ? 2 : 1;  // dS' buffers
    // stage full/empty, q_full[2], q_empty[2], ds_free, ds_full (DF), D2: ds_free, ds_full of buffer 1
    static constexpr int NBAR = 2 * NSTAGE + 6 + (D2 ? 2 : 0);
    // the base's 1024-byte alignment: at most 1024 - 128 bytes past a 128-aligned base (D2), 1024 past a 16-aligned
    // one (the static span words before it)
    static constexpr uint32_t ALIGN_SLACK = D2 ? 1024 - 128 : 1024;
    static constexpr size_t SMEM = 2 * KV_BYTES + 4 * QT_BYTES + NDS * DS_BYTES + NSTAGE * STAGE_BYTES +
                                   4 * BM * sizeof(float) + NBAR * sizeof(uint64_t) + (D2 ? 4 * sizeof(int) : 0) +
                                   ALIGN_SLACK;
    static_assert((DP == 64 && BM == 128) || (DP == 128 && BM == 64), "tile");
    static_assert(!D2 || (DP == 64 && BM == 128 && TW), "D2: D = 64 with the tensor writer");
    static_assert(SMEM <= 232448, "shared memory");
    static_assert(NSTAGE == 2, "one staging buffer per writer warp (warps 9, 10)");
};

enum { BAR_MMA = 1, BAR_LEAD = 4 };  // named barriers: the 256 MMA threads; DF's lead (2, 3: the epilogue's)

/* Kernel parameters: the Q and dO tensor maps (64-byte aligned, in parameter space), which of
 * each map's dimensions 1..3 holds (row, head, batch), and the arguments. */
struct V6Args {
    CUtensorMap tq, tdo;
    CUtensorMap tacc;  // TW: dq_acc as 2-D fp32 (DP columns, every workspace row), 32 x BM boxes, 128B swizzle
    BwdArgs a;
    int pos_q[3], pos_do[3];
    CUtensorMap tdk, tdv;  // dkv_tma: dK and dV as the Q map is (64 x 64 boxes: one warpgroup's rows)
    int pos_dk[3], pos_dv[3];
    int dkv_tma;  // dK / dV through shared memory and TMA stores (else fragment stores to global)
    int df_lead;  // DF: warpgroup 1 starts once warpgroup 0 has its first tile's exponentials (TACA_BWD_V6_DFLEAD=0: off)
};

/* The CTA's grid index as one number: G1 kernels run on a 1-D grid of nk * Hkv * B CTAs (key
 * tile fastest, the 3-D grid's order) and decode (key tile, KV head, batch) from it; volatile,
 * so that a decode after the tile loop reads it again instead of holding values through it. */
__device__ __forceinline__ int ctaid_x_volatile() {
    int x;
    asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(x));
    return x;
}

#if defined(TACA_BWD_TRACE)
/* Diagnostic build only (nvcc -DTACA_BWD_TRACE, e.g. TACA_NVCC_EXTRA=-DTACA_BWD_TRACE=1 python3 setup.py
 * build_ext): every CTA records where its time went, kTraceSlots 64-bit values at g_trace[cta id],
 * read by taca_bwd_trace_read (benchmarks/bwd_trace.py). Slots: 0 SM id, 1 start (globaltimer, ns),
 * 2 MMA loop end (ns), 3 key tile | chain position << 16 | chain << 24 | KV head << 32 | batch << 48,
 * 4..6 MMA thread 0's cycles waiting for a query tile (q_full), for dS' (ds_free + the CTA barrier),
 * for a free staging buffer (mb_empty); 7, 8 writer warps 0 / 1 (lane 0): cycles polling the chain
 * predecessor; 9, 10 waiting for a staged tile (mb_full); 11, 12 waiting for their writes;
 * 13, 14 their end (ns); 15 MMA thread 0's cycles from start to loop end (clock rate). The default
 * build has none of this (its SASS is unchanged). */
constexpr int kTraceSlots = 16, kTraceCtas = 16384;
__device__ unsigned long long g_trace[kTraceCtas * kTraceSlots];
/* Per query tile (the first kTraceTileCtas CTAs, tiles it < kTraceTiles), globaltimer ns: 0 MMA thread 0
 * staged its part (after its arrive), 1 the tile's writer lane 0 saw the predecessor's release (0 for a
 * chain's head and unordered modes), 2 it saw the tile staged, 3 it released the tile (its writes done). */
constexpr int kTraceTileCtas = 4096, kTraceTiles = 64;
__device__ unsigned long long g_trace_tiles[kTraceTileCtas * kTraceTiles * 4];
__device__ __forceinline__ unsigned long long trace_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned long long trace_smid() {
    unsigned s;
    asm volatile("mov.u32 %0, %%smid;\n" : "=r"(s));
    return s;
}
#define V6_TRACE_T0 const long long trace_c0_ = clock64()
#define V6_TRACE_ADD(acc) acc += static_cast<unsigned long long>(clock64() - trace_c0_)
#endif

/* DS (item 13): hand tile ti's dQ part q (this thread's rows qr0, qr0 + 8 and columns qc0 + 8 nt, + 1 of the tile)
 * to the row writer through staging buffer ti & 1 (free once the writer has read tile ti - 2 from it), as the
 * other forms do inline at the end of tile ti. (They keep their own copy: a lambda shared with them, even uncalled there, moved their loops' SASS.) */
template <typename C, int BM, bool TW>
__device__ __forceinline__ void stage_dq_rows(unsigned char *stage, uint32_t mb_full, uint32_t mb_empty, int ti, int qr0,
                                              int qc0, const float (&q)[32]) {
    const int sb = ti & 1;
    if (ti >= C::NSTAGE) mbar_wait(mb_empty + 8 * sb, ((ti / C::NSTAGE) - 1) & 1);
    unsigned char *dstage = stage + sb * C::STAGE_BYTES;
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            const int r = qr0 + half * 8, col = qc0 + nt * 8;
            // TW: 16-byte unit col / 4 of row r in the 32-column boxes (the swizzled tile layout)
            const uint32_t off = TW ? sw128_offset<BM>(r, col >> 2) + (col & 3) * 4 : r * C::SROW + col * 4;
            *reinterpret_cast<float2 *>(dstage + off) = make_float2(q[nt * 4 + 2 * half], q[nt * 4 + 2 * half + 1]);
        }
    fence_proxy_async();  // the copy engine (async proxy) reads what these generic stores wrote
    mbar_arrive(mb_full + 8 * sb);
}

/* The warpgroup's dQ part of a query tile over the CTA's BN keys (dS' of both warpgroups x K), issued (the caller
 * fences before and commits after). */
template <typename T, int BM, int BN>
__device__ __forceinline__ void issue_dq_product(float (&q)[32], uint64_t d_dsq, uint64_t d_kq) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
        wgmma_ss<T, 64, 0, 1>(q, desc_advance(d_dsq, (kk >> 2) * BM * 128 + (kk & 3) * 32),
                              desc_advance(d_kq, kk * 16 * 128), kk > 0);
}

/* dK += dS'^T Q for the warpgroup's 64 keys (dS'^T from registers, Q's BM rows from shared memory), issued. */
template <typename T, int DP, int BM>
__device__ __forceinline__ void issue_dk_product(float (&dk)[DP / 2], const uint32_t (&da)[BM / 16][4], uint64_t d_q_mn) {
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk)
        wgmma_rs<T, DP, 1>(dk, da[kk], desc_advance(d_q_mn, kk * 16 * 128), 1);
}

/* DF (item 16): query tile ti's dQ part once ds_full (D2: that of its dS' buffer ti & 1) says both warpgroups stored
 * its dS' (phase ti & 1; D2 (ti >> 1) & 1), issued, committed and waited for (with any group in flight before it). */
template <typename T, int BM, int BN, bool D2 = false>
__device__ __forceinline__ void df_dq_product(float (&q)[32], uint32_t ds_full, int ti, uint64_t d_dsq, uint64_t d_kq) {
    mbar_wait(ds_full, D2 ? (ti >> 1) & 1 : ti & 1);
    wgmma_fence();
    issue_dq_product<T, BM, BN>(q, d_dsq, d_kq);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<32>(q);
}

/* MASK: a.mask.data != NULL (its own instance: the unmasked one carries no mask code).
 * G1: the 1-D grid (see ctaid_x_volatile), the default at D = 64 (TACA_BWD_V6_GRID=3d: the 3-D one).
 * PF (item 11, BM = 64): the text span read into registers once, before the tile loop, and each tile's
 * lse2 / delta rows loaded while its S / dP products run (not after their wait).
 * IX (item 12, with PF): the MMA warps step their tile's (head, query tile) on from the last one, not by a
 * division per tile.
 * DS (item 13, with IX; more than one key tile: the default at D = 72..128 until DF took its place, a switch in D = 64's
 * default pair): tile
 * it's dQ is staged at tile it + 1, while its S / dP products run, not between the dQ and dK waits of tile it.
 * DF (item 16, with IX, not with DS; D = 72..128 with the row writer, more than one key tile, no mask; the default
 * there, TACA_BWD_V6_DF=0 gives DS): tile it's dQ product itself is issued at tile it + 1 (after S), so no CTA barrier is left in
 * the loop: a warpgroup publishes its dS' half by an mbarrier (ds_full) and goes on to dK, and the two warpgroups may
 * drift apart by up to about half a tile (one's exponentials beside the other's products), where the barrier kept
 * them in step.
 * D2 (with DF, D = 64; see Cfg): two dS' buffers, so that a warpgroup's dS' store waits for tile it - 2's dQ products,
 * not it - 1's, and either warpgroup may lead by up to about a tile and a half. */
template <typename T, int DP, int BM, bool MASK, bool TW, bool G1 = false, bool PF = false, bool IX = false,
          bool DS = false, bool DF = false, bool D2 = false>
__global__ void __launch_bounds__(384, 1) taca_bwd_sm90_v6_kernel(const __grid_constant__ V6Args p) {
#if TACA_SM90A
    const BwdArgs &a = p.a;
    using C = Cfg<DP, BM, TW, D2>;
    static_assert(!D2 || DF, "D2: with DF");
    constexpr int BN = C::BN, NT = BM / 8, NS = C::NSTAGE;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sk = (raw + 1023u) & ~1023u;
    unsigned char *const smem = smem_raw + (sk - raw);  // generic pointer to the aligned base
    const uint32_t sv = sk + C::KV_BYTES;
    const uint32_t sq = sv + C::KV_BYTES;        // [2] Q tiles
    const uint32_t sdo = sq + 2 * C::QT_BYTES;   // [2] dO tiles
    const uint32_t sds = sdo + 2 * C::QT_BYTES;  // [NDS] dS' (BM x 128 keys), K-major
    // [NS] dQ staging buffers (1024-byte aligned: the TMA boxes' 128B swizzle), then lse2, delta
    unsigned char *const stage = smem + (sds + C::NDS * C::DS_BYTES - sk);
    float *const sL = reinterpret_cast<float *>(stage + NS * C::STAGE_BYTES);  // [2][BM] lse2
    float *const sDl = sL + 2 * BM;                                             // [2][BM] delta
    const uint32_t mb_full = smem_u32(sDl + 2 * BM);                  // [NS] mbarriers, then
    const uint32_t mb_empty = mb_full + 8 * NS;                       // [NS] (8 bytes each)
    const uint32_t q_full = mb_empty + 8 * NS;                        // [2] tile landed (TMA)
    const uint32_t q_empty = q_full + 16;                             // [2] tile read by both
    const uint32_t ds_free = q_empty + 16;                            // dS' read by both
    const uint32_t ds_full = ds_free + 8;                             // DF: dS' stored by both
    // (D2: buffer 1's at ds_free + 16, ds_full + 16)
    // the key / query text spans, by thread 0 for all: static shared memory, D2 dynamic (after the barriers)
    int *s_span;
    if constexpr (D2) {
        s_span = reinterpret_cast<int *>(sDl + 2 * BM + 2 * C::NBAR);
    } else {
        __shared__ int s_span_st[4];
        s_span = s_span_st;
    }

    const int nq = a.nq, nk = a.nk;
    const int nqt = a.group * nq;  // flattened query tiles it = (h - h0) * nq + query tile
    const int g1x = G1 ? ctaid_x_volatile() : 0, g1r = G1 ? g1x / a.nk : 0;
    const int jt = G1 ? g1x - g1r * a.nk : blockIdx.x;
    const int hk = G1 ? g1r % a.Hkv : blockIdx.y, b = G1 ? g1r / a.Hkv : blockIdx.z;
    const int h0 = hk * a.group;  // the group's first query head
    const int64_t bh = static_cast<int64_t>(b) * a.H + h0;
    const int seg = jt / a.seg_size, seg_pos = jt % a.seg_size;
    const int seg_len = min(a.seg_size, nk - seg * a.seg_size);
    const bool ordered = a.mode == taca_bwd::kOrdered && nk > 1;
    // skew (item 10): at step it this CTA takes flattened query tile it + soff (mod nqt), soff = -jt
    const int soff = a.skew ? (nqt - jt % nqt) % nqt : 0;
    int *sem_row = a.sem + (seg * static_cast<int64_t>(a.B) * a.H + bh) * nq;
    float *acc_base = a.dq_acc + (seg * static_cast<int64_t>(a.B) * a.H + bh) * a.Np * C::ACC_LD;

    const T *kb = static_cast<const T *>(a.k) + b * a.ks_b + hk * a.ks_h;
    const T *vb = static_cast<const T *>(a.v) + b * a.vs_b + hk * a.vs_h;
    const float *lse2b = a.lse2 + bh * a.Np;
    const float *deltab = a.delta + bh * a.Np;

#if defined(TACA_BWD_TRACE)
    const int trace_cid = G1 ? g1x : static_cast<int>(blockIdx.x + a.nk * (blockIdx.y + gridDim.y * blockIdx.z));
    unsigned long long *const trace = trace_cid < kTraceCtas ? g_trace + trace_cid * kTraceSlots : nullptr;
    const long long trace_clk0 = clock64();
    unsigned long long *const trace_t =
        trace_cid < kTraceTileCtas ? g_trace_tiles + static_cast<size_t>(trace_cid) * kTraceTiles * 4 : nullptr;
    if (threadIdx.x == 0 && trace) {
        trace[0] = trace_smid();
        trace[1] = trace_ns();
        trace[3] = static_cast<unsigned long long>(jt) | (static_cast<unsigned long long>(seg_pos) << 16) |
                   (static_cast<unsigned long long>(seg) << 24) | (static_cast<unsigned long long>(hk) << 32) |
                   (static_cast<unsigned long long>(b) << 48);
    }
#endif
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < NS; ++s) {
            mbar_init(mb_full + 8 * s, 256);  // every MMA thread arrives once per staged tile
            mbar_init(mb_empty + 8 * s, 32);  // every lane of the buffer's writer warp once per tile read
        }
        for (int s = 0; s < 2; ++s) {
            // the producer's arrive after its warp stored lse2 / delta (DF: every lane's after its own stores), its
            // arrive.expect_tx, the bytes
            mbar_init(q_full + 8 * s, DF ? 33 : 2);
            // every MMA thread (lane 0 of each warp after __syncwarp would do, but compute-sanitizer
            // racecheck does not model __syncwarp: it then reports the other lanes' reads)
            mbar_init(q_empty + 8 * s, 256);
        }
#pragma unroll
        for (int s = 0; s < C::NDS; ++s) {
            mbar_init(ds_free + 16 * s, 8);
            if constexpr (DF) mbar_init(ds_full + 16 * s, 256);  // every MMA thread after its dS' stores (and proxy fence)
        }
        mbar_init_fence();
    }
    __syncthreads();  // initialised before any thread arrives or waits
    // The whole warpgroup, before its roles split: it frees 128 x (168 - 24) registers, exactly what
    // the two MMA warpgroups take to go from 168 to 240 (setmaxnreg.inc waits for freed registers).
    if (threadIdx.x >= 256) setmaxnreg_dec<24>();
    if (threadIdx.x >= 256 && threadIdx.x < 288) {
        // Producer (warp 8): query tile it into ring slot it & 1 once both MMA warpgroups released
        // the tile it - 2 held there: lse2 / delta by the warp's ordinary loads and stores, then
        // lane 0 arrives and loads Q and dO by TMA.
        const int pl = threadIdx.x - 256;
        if (pl == 0) {
            // bwd_dq_convert_tiles (a programmatic dependent launch) may start once every CTA got here
            if (a.dq_overlap) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
            tma_prefetch_desc(&p.tq);
            tma_prefetch_desc(&p.tdo);
        }
        for (int it = 0; it < nqt; ++it) {
            const int buf = it & 1;
            const int x = taca_bwd::skew_tile(it, soff, nqt);  // the tile taken at step it
            if (it >= 2) mbar_wait(q_empty + 8 * buf, ((it >> 1) - 1) & 1);
            // lanes 0..15 lse2, 16..31 delta, 16 bytes each (BM / 64 per lane)
            const float4 *src = reinterpret_cast<const float4 *>((pl < 16 ? lse2b : deltab) + x * BM);
            const uint32_t dst = smem_u32((pl < 16 ? sL : sDl) + buf * BM);
#pragma unroll
            for (int c = pl & 15; c < BM / 4; c += 16) {
                const float4 x = src[c];
                asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst + 16 * c), "f"(x.x), "f"(x.y),
                             "f"(x.z), "f"(x.w)
                             : "memory");
            }
            if constexpr (DF) {
                // every lane arrives after its own stores: racecheck does not model __syncwarp, and without the
                // loop's CTA barrier (DF) it reported the other lanes' stores against the MMA threads' reads
                mbar_arrive(q_full + 8 * buf);
                if (pl != 0) continue;
            } else {
                __syncwarp();
                if (pl != 0) continue;
                mbar_arrive(q_full + 8 * buf);  // lse2 / delta stored (__syncwarp: the other lanes' too)
            }
            mbar_arrive_expect_tx(q_full + 8 * buf, C::TILE_TX);
            const int hh = x / nq;
            const int i0 = (x - hh * nq) * BM, h = h0 + hh;
#pragma unroll
            for (int cb = 0; cb < DP / 64; ++cb) {
                tma_load_4d(sq + buf * C::QT_BYTES + cb * BM * 128, &p.tq, q_full + 8 * buf, cb * 64,
                            ws_coord(p.pos_q, 1, i0, h, b), ws_coord(p.pos_q, 2, i0, h, b),
                            ws_coord(p.pos_q, 3, i0, h, b));
                tma_load_4d(sdo + buf * C::QT_BYTES + cb * BM * 128, &p.tdo, q_full + 8 * buf, cb * 64,
                            ws_coord(p.pos_do, 1, i0, h, b), ws_coord(p.pos_do, 2, i0, h, b),
                            ws_coord(p.pos_do, 3, i0, h, b));
            }
        }
        return;
    }
    if (threadIdx.x >= 288) {
        // dQ writer, two warps: warp 9 + w takes the tiles it = w, w + 2, .. (staging buffer w).
        // For tile it: poll the chain predecessor's release of it (while the MMA warps still
        // compute it), wait until it is staged, add it (or store it: the chain's head) with one
        // TMA bulk operation (rows) or DP / 32 tensor ones (TW), free the staging buffer once read,
        // then wait for the writes and release tile it to the successor at once (st.release). A
        // warp blocks on its writes' completion while the other warp takes the next tile.
        if (nk == 1 || threadIdx.x >= 352) return;
        const int w = (threadIdx.x - 288) >> 5, wl = threadIdx.x & 31;
        const bool racy_first = a.mode == taca_bwd::kRacy;
        const int chain0 = seg * a.seg_size;  // the chain's first key tile (skew: its rank rule)
#if defined(TACA_BWD_TRACE)
        float *accb = acc_base;  // (unordered: seg = 0 with one buffer; the chains' with atomicseg)
#else
        float *accb = ordered ? acc_base : a.dq_acc + bh * a.Np * C::ACC_LD;
#endif
        const bool releases_unordered = a.dq_overlap != 0;
        const uint32_t src = smem_u32(stage + w * C::STAGE_BYTES);
        // TW: the tile's first row in the 2-D view of dq_acc
        const int row0 = static_cast<int>((accb - a.dq_acc) / DP);
        if (TW && wl == 0) tma_prefetch_desc(&p.tacc);
        if constexpr (!TW) {
            // The row writer adds a staged tile with one bulk operation, padding included (it lands
            // in the workspace rows' padding, never read): zero this buffer's padding once.
            unsigned char *const pad = stage + w * C::STAGE_BYTES + DP * 4;
            for (int r = wl; r < BM; r += 32) {
                *reinterpret_cast<float4 *>(pad + r * C::SROW) = make_float4(0.f, 0.f, 0.f, 0.f);
                *reinterpret_cast<float4 *>(pad + r * C::SROW + 16) = make_float4(0.f, 0.f, 0.f, 0.f);
            }
            fence_proxy_async();  // these generic writes before the copy engine's reads
            __syncwarp();
        }
#if defined(TACA_BWD_TRACE)
        unsigned long long tr_poll = 0, tr_full = 0, tr_write = 0;
#endif
        for (int it = w; it < nqt; it += NS) {
            const int x = taca_bwd::skew_tile(it, soff, nqt);  // the tile of step it
            // The link's rank in tile x's chain order: its chain position without skew; with skew
            // the links reach x at steps (x + chain0 + p) mod nqt, p = 0 .. seg_len - 1 (seg_len <=
            // nqt), so the order by step starts at p = nqt - y where that wraps (y = (x + chain0) mod
            // nqt > nqt - seg_len), else at 0, and goes on cyclically.
            const int rank = taca_bwd::skew_rank(x, seg_pos, seg_len, chain0, nqt, a.skew != 0);
            const bool first = ordered ? rank == 0 : racy_first;
            // ordered: a link releases tile x to its successor, and with dq_overlap the chain's last
            // link releases it too (for bwd_dq_convert_tiles); unordered with dq_overlap: every CTA
            // counts the tile once its adds completed
            const bool releases = ordered ? (a.dq_overlap || rank < seg_len - 1) : releases_unordered;
            if (ordered && rank > 0) {
                if (wl == 0) {
#if defined(TACA_BWD_TRACE)
                    V6_TRACE_T0;
#endif
                    while (taca_bwd::ld_acquire(sem_row + x) < rank) {
                    }
#if defined(TACA_BWD_TRACE)
                    V6_TRACE_ADD(tr_poll);
                    if (trace_t && it < kTraceTiles) trace_t[it * 4 + 1] = trace_ns();
#endif
                }
                __syncwarp();
                asm volatile("fence.proxy.async.global;\n" ::: "memory");
            }
#if defined(TACA_BWD_TRACE)
            {
                V6_TRACE_T0;
                mbar_wait(mb_full + 8 * w, (it / NS) & 1);
                V6_TRACE_ADD(tr_full);
                if (wl == 0 && trace_t && it < kTraceTiles) trace_t[it * 4 + 2] = trace_ns();
            }
#else
            mbar_wait(mb_full + 8 * w, (it / NS) & 1);  // tile it staged
#endif
            // lane 0: TW: DP / 32 tensor operations (32 columns x BM rows each); rows: the whole tile
            // (BM rows of SROW bytes, contiguous in the workspace: row stride ACC_LD) by one bulk
            // operation (64 row operations before took about 3 us from staged to released, on the
            // chain's critical path; KERNEL_LOG, twelfth session). The warp frees the buffer once
            // they read it.
            if (wl == 0) {
                if constexpr (TW) {
#pragma unroll
                    for (int cb = 0; cb < DP / 32; ++cb) {
                        if (first) taca_bwd90::tma_store_2d(&p.tacc, src + cb * BM * 128, cb * 32, row0 + x * BM);
                        else taca_bwd90::tma_add_2d(&p.tacc, src + cb * BM * 128, cb * 32, row0 + x * BM);
                    }
                } else {
                    float *dst = accb + static_cast<int64_t>(x) * BM * C::ACC_LD;
                    if (first) bulk_store(dst, src, BM * C::SROW);
                    else bulk_add_f32(dst, src, BM * C::SROW);
                }
                bulk_commit();
                bulk_wait_read();
            }
            __syncwarp();
            mbar_arrive(mb_empty + 8 * w);  // staging buffer free again
            if (releases && wl == 0) {
#if defined(TACA_BWD_TRACE)
                V6_TRACE_T0;
#endif
                bulk_wait_write();  // tile it added (+ proxy fence)
#if defined(TACA_BWD_TRACE)
                V6_TRACE_ADD(tr_write);
#endif
                if (ordered) taca_bwd::st_release(sem_row + x, rank + 1);
                else taca_bwd::red_release_add(sem_row + x, 1);
#if defined(TACA_BWD_TRACE)
                if (trace_t && it < kTraceTiles) trace_t[it * 4 + 3] = trace_ns();
#endif
            }
        }
        bulk_wait_write();  // the CTA may not end before its bulk operations did
#if defined(TACA_BWD_TRACE)
        if (wl == 0 && trace) {
            trace[7 + w] = tr_poll;
            trace[9 + w] = tr_full;
            trace[11 + w] = tr_write;
            trace[13 + w] = trace_ns();
        }
#endif
        return;
    }
    setmaxnreg_inc<240>();

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = jt * BN;
    const int N = a.N, Nk = a.Nk, D = a.D;
    const bool masked = MASK && !(a.mask.q == 0 && (a.mask.h == 0 || a.group == 1) &&
                                  keys_attend<BN>(a.mask, b * a.mask.b + h0 * a.mask.h, j0, Nk, lane));

    const float gam = a.gamma[b];
    const float grev = a.gamma_reverse;
    const float lg = a.scale * taca_bwd::kLog2e;

    // K and V once (keys past Nk: zero rows, as v5), then every tile comes from the producer.
    load_tile_sw128<T, BN, DP, 256>(sk, kb, a.ks_n, j0, Nk, D, tid);
    load_tile_sw128<T, BN, DP, 256>(sv, vb, a.vs_n, j0, Nk, D, tid);
    cp_async_commit();

    const int kw0 = j0 + 64 * wg;  // the warpgroup's first key
    const int kr0 = kw0 + 16 * warp + g, kr1 = kr0 + 8;
    if (tid == 0) {
        const Span sp = span_of(a.spans, b, a.text_begin, a.text_end, a.q_text_begin, a.q_text_end);
        s_span[0] = sp.kb;
        s_span[1] = sp.ke;
        s_span[2] = sp.qb;
        s_span[3] = sp.qe;
    }

    float dv[DP / 2], dk[DP / 2];
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) dv[i] = dk[i] = 0.f;

    const uint32_t k_wg = sk + wg * 64 * 128, v_wg = sv + wg * 64 * 128;  // rows 64 wg.. of each block
    // Descriptors of the fixed operands, advanced per k-step by desc_advance (constant offsets).
    // dQ: D = 128: warpgroup w makes dQ columns 64w.. of the BM = 64 rows; D = 64: rows 64w.. of
    // BM = 128 (as v5).
    constexpr int QROWS = BM == 128 ? 64 : 0;
    constexpr int QCOLS = BM == 128 ? 0 : 64;
    const uint64_t d_k = desc_sw128(k_wg), d_v = desc_sw128(v_wg);
    const uint64_t d_dsq = desc_sw128(sds + QROWS * wg * 128), d_kq = desc_sw128(sk + (QCOLS / 64) * wg * BN * 128);

    cp_async_wait<0>();
    fence_proxy_async();
    named_bar_sync(BAR_MMA, 256);  // K, V (and s_span) visible to both warpgroups and to wgmma
    // PF: lse2 / delta read ahead at BM = 64 only (at BM = 128, 32 registers each: ptxas spilled 12 bytes
    // with the lse2 rows ahead, 4 without), the span at both
    constexpr bool PFL = PF && BM == 64;
    int span_r[4] = {0, 0, 0, 0};  // PF: the span, read once (the loop's fences keep it from being hoisted)
    if constexpr (PF) {
#pragma unroll
        for (int i = 0; i < 4; ++i) span_r[i] = s_span[i];
    }

#if defined(TACA_BWD_TRACE)
    unsigned long long tr_q = 0, tr_ds = 0, tr_empty = 0;
#endif
    static_assert(!IX || PF, "IX: with PF");
    // IX: the tile of step it as (flattened index, head, query tile), stepped on at the loop's end
    int ix_x = soff, ix_h = IX ? soff / nq : 0, ix_q = IX ? soff - (soff / nq) * nq : 0;
    auto ix_step = [&]() {
        if constexpr (IX) {  // the next step's tile: x + 1, wrapping at nqt (the skew's cycle) and at nq per head
            if (++ix_x == nqt) {
                ix_x = ix_h = ix_q = 0;
            } else if (++ix_q == nq) {
                ix_q = 0;
                ++ix_h;
            }
        }
    };
    static_assert(!DS || (IX && ((DP == 128 && BM == 64 && !TW) || (DP == 64 && BM == 128 && TW))),
                  "DS: with IX, D = 72..128 with the row writer or D = 64 with the tensor writer");
    static_assert(!DF || (IX && !DS && ((DP == 128 && BM == 64 && !TW) || (DP == 64 && BM == 128 && TW))),
                  "DF: with IX, not DS, D = 72..128 with the row writer or D = 64 with the tensor writer");
    float dq_ds[DS || DF ? 32 : 1];  // DS: tile it's dQ part, kept until it is staged at tile it + 1 (stage_dq_rows)
    // DF: warpgroup 1 waits for warpgroup 0's first exponentials (BAR_LEAD), so that the two start apart
    if constexpr (DF) {
        if (p.df_lead && wg == 1) named_bar_sync(BAR_LEAD, 256);
    }
    // D2: tile ti's dQ product over dS' buffer ti & 1 (its ds_full and phase, its descriptor), for DF's calls below
    auto df_dq = [&](int ti) {
        if constexpr (D2)
            df_dq_product<T, BM, BN, true>(dq_ds, ds_full + 16 * (ti & 1), ti, desc_advance(d_dsq, (ti & 1) * C::DS_BYTES),
                                           d_kq);
        else if constexpr (DF)
            df_dq_product<T, BM, BN>(dq_ds, ds_full, ti, d_dsq, d_kq);
    };
    for (int it = 0; it < nqt; ++it) {
        const int buf = it & 1;
        const int x = IX ? ix_x : taca_bwd::skew_tile(it, soff, nqt);  // the tile of step it (skew)
        const int hh = IX ? ix_h : x / nq;
        const int i0 = (IX ? ix_q : x - hh * nq) * BM;
#if defined(TACA_BWD_TRACE)
        {
            V6_TRACE_T0;
            mbar_wait(q_full + 8 * buf, (it >> 1) & 1);
            V6_TRACE_ADD(tr_q);
        }
#else
        mbar_wait(q_full + 8 * buf, (it >> 1) & 1);  // Q, dO, lse2, delta of tile it landed
#endif

        const uint32_t qt = sq + buf * C::QT_BYTES, dot = sdo + buf * C::QT_BYTES;
        const uint64_t d_q = desc_sw128(qt), d_do = desc_sw128(dot);
        const uint64_t d_q_mn = desc_sw128_mn(qt, BM * 128), d_do_mn = desc_sw128_mn(dot, BM * 128);
        float s[NT * 4], dp[NT * 4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk)
            wgmma_ss<T, BM, 0, 0>(s, desc_advance(d_k, (kk >> 2) * BN * 128 + (kk & 3) * 32),
                                  desc_advance(d_q, (kk >> 2) * BM * 128 + (kk & 3) * 32), kk > 0);
        wgmma_commit();
        // DS: the previous tile's dQ part staged while S runs (before dP's issue: with dQ's 32 registers live
        // beside S's, dP's, dK's and dV's accumulators ptxas serialized the wgmmas and spilled)
        if constexpr (DS) {
            if (it > 0)
                stage_dq_rows<C, BM, TW>(stage, mb_full, mb_empty, it - 1, QROWS * wg + 16 * warp + g, QCOLS * wg + 2 * t, dq_ds);
        }
        // DF: tile it - 1's dQ part over the 128 keys once both warpgroups stored its dS' (issued after S, waited with
        // it: the staging then runs as DS's does), dS' freed, the part staged
        if constexpr (DF) {
            if (it > 0) {
                df_dq(it - 1);
                fence_regs<NT * 4>(s);
                __syncwarp();
                // this warp's share of the dQ product read dS' of tile it - 1 (D2: in buffer (it - 1) & 1)
                if (lane == 0) mbar_arrive(D2 ? ds_free + 16 * ((it - 1) & 1) : ds_free);
                stage_dq_rows<C, BM, TW>(stage, mb_full, mb_empty, it - 1, QROWS * wg + 16 * warp + g, QCOLS * wg + 2 * t, dq_ds);
            }
        }
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk)
            wgmma_ss<T, BM, 0, 0>(dp, desc_advance(d_v, (kk >> 2) * BN * 128 + (kk & 3) * 32),
                                  desc_advance(d_do, (kk >> 2) * BM * 128 + (kk & 3) * 32), kk > 0);
        wgmma_commit();
        // PF: this tile's lse2 rows (in shared memory since q_full) read while S and dP run
        float2 l2v[PFL ? NT : 1];
        if constexpr (PFL) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                l2v[nt] = *reinterpret_cast<const float2 *>(sL + buf * BM + nt * 8 + 2 * t);
        }
        wgmma_wait<1>();
        fence_regs<NT * 4>(s);

        // P^T and dS'^T exactly as v5 (taca_bwd_sm90.cu). Both kernels stay (v6 the default, v5 where
        // v6 cannot encode its tensor maps), but a shared helper changed the PTX of both (the span
        // comparisons come out reordered), so this copy stays until a device run shows such a helper
        // costs nothing.
        const float *lrow = sL + buf * BM;
        const float *drow = sDl + buf * BM;
        // the lse2 pair of columns nt * 8 + 2 t: read ahead (PFL) or here
        auto lse2_at = [&](int nt) -> float2 {
            if constexpr (PFL) return l2v[nt];
            else return *reinterpret_cast<const float2 *>(lrow + nt * 8 + 2 * t);
        };
        const int ksb = PF ? span_r[0] : s_span[0], kse = PF ? span_r[1] : s_span[1];  // key text span [ksb, kse)
        const int qsb = PF ? span_r[2] : s_span[2], qse = PF ? span_r[3] : s_span[3];  // query text span [qsb, qse)
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
                const float2 l2 = lse2_at(nt);
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt * 4 + e] = fast_exp2(s[nt * 4 + e] * cf - ((e & 1) ? l2.y : l2.x));
            }
        } else if (!masked) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * t;
                const float2 l2 = lse2_at(nt);
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
            // A key mask (mask.q == 0): the thread's two keys kr0, kr1 have one term each for every
            // query of the tile, read once (not 2 x NT x 2 byte loads with 64-bit offsets per tile);
            // -inf for keys past Nk and queries past N, as below (the same sums, bitwise).
            const float2 mk = key_mask_terms(a.mask, b * a.mask.b + (h0 + hh) * a.mask.h, kr0, Nk);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * t;
                const float2 l2 = lse2_at(nt);
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
                const float2 l2 = lse2_at(nt);
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
        if constexpr (DF) {
            if (p.df_lead && wg == 0 && it == 0) named_bar_arrive(BAR_LEAD, 256);  // warpgroup 1 may start
        }
        float2 dlv[PFL ? NT : 1];  // PF: the delta rows, read while dP runs
        if constexpr (PFL) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                dlv[nt] = *reinterpret_cast<const float2 *>(drow + nt * 8 + 2 * t);
        }
        auto delta_at = [&](int nt) -> float2 {  // the delta pair of columns nt * 8 + 2 t, as lse2_at
            if constexpr (PFL) return dlv[nt];
            else return *reinterpret_cast<const float2 *>(drow + nt * 8 + 2 * t);
        };
        wgmma_wait<0>();
        fence_regs<NT * 4>(dp);
        if (uniform) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float2 dl = delta_at(nt);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dp[nt * 4 + e] = s[nt * 4 + e] * (dp[nt * 4 + e] - ((e & 1) ? dl.y : dl.x)) * mu;
            }
        } else {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * t;
                const float2 dl = delta_at(nt);
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
            const float *s0 = s + 8 * kk;
            pa[kk][0] = pack2<T>(s0[0], s0[1]);
            pa[kk][1] = pack2<T>(s0[2], s0[3]);
            pa[kk][2] = pack2<T>(s0[4], s0[5]);
            pa[kk][3] = pack2<T>(s0[6], s0[7]);
        }
        // dV += P^T dO first (group 1): it runs while dS' is packed, stored and published. One
        // m64nDPk16 per k-step (dO's two 64-column blocks BM * 128 bytes apart at DP = 128).
        fence_regs<DP / 2>(dv);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
            wgmma_rs<T, DP, 1>(dv, pa[kk], desc_advance(d_do_mn, kk * 16 * 128), 1);
        wgmma_commit();
        // dS' of tile it - 1 (D2: it - 2, the last in this buffer) read by both warpgroups' dQ products before it is
        // overwritten
        auto wait_ds_free = [&]() {
            if constexpr (D2) {
                if (it >= 2) mbar_wait(ds_free + 16 * buf, ((it - 2) >> 1) & 1);
            } else {
                if (it > 0) mbar_wait(ds_free, (it - 1) & 1);
            }
        };
#if defined(TACA_BWD_TRACE)
        {
            V6_TRACE_T0;
            wait_ds_free();
            V6_TRACE_ADD(tr_ds);
        }
#else
        wait_ds_free();
#endif
        const uint32_t sds_it = D2 ? sds + buf * C::DS_BYTES : sds;  // (D2: buffer it & 1)
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            const float *d0 = dp + 8 * kk;
            da[kk][0] = pack2<T>(d0[0], d0[1]);
            da[kk][1] = pack2<T>(d0[2], d0[3]);
            da[kk][2] = pack2<T>(d0[4], d0[5]);
            da[kk][3] = pack2<T>(d0[6], d0[7]);
            store_block_trans<BM>(sds_it, da[kk], 64 * wg + 16 * warp, 16 * kk, lane);
        }
        fence_proxy_async();  // the stmatrix writes of dS' -> visible to wgmma after the barrier
        if constexpr (DF) {  // dS' published (no barrier: dQ is the next tile's), dK += dS'^T Q, then the tile ends
            mbar_arrive(D2 ? ds_full + 16 * buf : ds_full);
            fence_regs<DP / 2>(dk);
            wgmma_fence();
            issue_dk_product<T, DP, BM>(dk, da, d_q_mn);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs<DP / 2>(dv);
            fence_regs<BM / 4>(&pa[0][0]);
            fence_regs<DP / 2>(dk);
            fence_regs<BM / 4>(&da[0][0]);
            mbar_arrive(q_empty + 8 * buf);  // Q, dO, lse2, delta of tile it read
            ix_step();
            continue;
        }
#if defined(TACA_BWD_TRACE)
        {
            V6_TRACE_T0;
            named_bar_sync(BAR_MMA, 256);
            V6_TRACE_ADD(tr_ds);
        }
#else
        named_bar_sync(BAR_MMA, 256);  // dS' complete in shared memory
#endif

        fence_regs<DP / 2>(dk);
        // dQ part (group 2) over the 128 keys, then dK += dS'^T Q (group 3).
        float dq[32];
        wgmma_fence();
        issue_dq_product<T, BM, BN>(dq, d_dsq, d_kq);
        wgmma_commit();
        issue_dk_product<T, DP, BM>(dk, da, d_q_mn);
        wgmma_commit();
        if constexpr (DS) {  // dV, dQ and dK done; dQ is staged at the next tile's top (or after the loop)
            wgmma_wait<0>();
            fence_regs<32>(dq);
            fence_regs<DP / 2>(dv);
            fence_regs<BM / 4>(&pa[0][0]);
            fence_regs<DP / 2>(dk);
            fence_regs<BM / 4>(&da[0][0]);
#pragma unroll
            for (int i = 0; i < (DS ? 32 : 0); ++i) dq_ds[i] = dq[i];
            __syncwarp();
            if (lane == 0) mbar_arrive(ds_free);  // this warp's share of the dQ product read dS'
            mbar_arrive(q_empty + 8 * buf);       // Q, dO, lse2, delta of tile it read
            ix_step();
            continue;
        }
        wgmma_wait<1>();  // dV and dQ done; dK still running
        fence_regs<32>(dq);
        fence_regs<DP / 2>(dv);
        fence_regs<BM / 4>(&pa[0][0]);  // P^T's registers are free from here
        __syncwarp();
        if (lane == 0) mbar_arrive(ds_free);  // this warp's share of the dQ product read dS'

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
                    taca_bwd::store_pair<T>(dqrow, qc0 + nt * 8, D, a.pair_store != 0, dq[nt * 4 + 2 * half] * a.scale,
                                            dq[nt * 4 + 2 * half + 1] * a.scale);
            }
        } else {
            // Hand the part to the writer through staging buffer it & 1 (free once the writer
            // has read tile it - 2 from it).
            const int sb = it & 1;
#if defined(TACA_BWD_TRACE)
            {
                V6_TRACE_T0;
                if (it >= NS) mbar_wait(mb_empty + 8 * sb, ((it / NS) - 1) & 1);
                V6_TRACE_ADD(tr_empty);
            }
#else
            if (it >= NS) mbar_wait(mb_empty + 8 * sb, ((it / NS) - 1) & 1);
#endif
            unsigned char *dstage = stage + sb * C::STAGE_BYTES;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = qr0 + half * 8;
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    const int col = qc0 + nt * 8;  // even: 8 bytes inside one 16-byte unit
                    // TW: 16-byte unit col / 4 of row r in the 32-column boxes (the swizzled tile
                    // layout of the bf16 operands, 8 units per 128-byte row)
                    const uint32_t off = TW ? sw128_offset<BM>(r, col >> 2) + (col & 3) * 4 : r * C::SROW + col * 4;
                    *reinterpret_cast<float2 *>(dstage + off) = make_float2(dq[nt * 4 + 2 * half], dq[nt * 4 + 2 * half + 1]);
                }
            }
            // the copy engine (async proxy) reads what these generic stores wrote
            fence_proxy_async();
            mbar_arrive(mb_full + 8 * sb);
#if defined(TACA_BWD_TRACE)
            if (tid == 0 && trace_t && it < kTraceTiles) trace_t[it * 4] = trace_ns();
#endif
        }
        wgmma_wait<0>();
        fence_regs<DP / 2>(dk);
        fence_regs<BM / 4>(&da[0][0]);  // dS'^T stays untouched until the dK wgmma completed
        mbar_arrive(q_empty + 8 * buf);  // Q, dO, lse2, delta of tile it read
        ix_step();
        (void)x;
    }
    if constexpr (DS)  // the last tile's dQ part (nqt >= 1)
        stage_dq_rows<C, BM, TW>(stage, mb_full, mb_empty, nqt - 1, QROWS * wg + 16 * warp + g, QCOLS * wg + 2 * t, dq_ds);
    if constexpr (DF) {  // the last tile's dQ product and its staging
        df_dq(nqt - 1);
        stage_dq_rows<C, BM, TW>(stage, mb_full, mb_empty, nqt - 1, QROWS * wg + 16 * warp + g, QCOLS * wg + 2 * t, dq_ds);
    }
#if defined(TACA_BWD_TRACE)
    if (tid == 0 && trace) {
        trace[2] = trace_ns();
        trace[4] = tr_q;
        trace[5] = tr_ds;
        trace[6] = tr_empty;
        trace[15] = static_cast<unsigned long long>(clock64() - trace_clk0);
    }
#endif
    // dK = scale * dK', dV (summed over the group) of key/value head hk: rows kr0, kr1.
    if (p.dkv_tma) {
        // Through shared memory: each warpgroup stages its 64 rows into the K and V tiles (K once
        // both warpgroups' last dQ products read it: the barrier), then one thread of it stores
        // them with DP / 64 TMA boxes per tensor. A CTA's direct fragment stores took several us
        // (8 rows x 16 bytes per warp instruction) before the next CTA could start on its SM.
        // Every value the epilogue needs is read again here (volatile), none held through the loop:
        // values live across it changed ptxas's schedule of the D = 128 tile loop.
        int etid, ecx, ecy, ecz;
        asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(etid));
        asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(ecx));
        asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(ecy));
        asm volatile("mov.u32 %0, %%ctaid.z;\n" : "=r"(ecz));
        const int ewg = etid >> 7, erow = 64 * ewg + 16 * ((etid >> 5) & 3), elane = etid & 31;
        const int ejt = G1 ? ecx % a.nk : ecx, er = G1 ? ecx / a.nk : 0;
        const int ehk = G1 ? er % a.Hkv : ecy, eb = G1 ? er / a.Hkv : ecz;
        uint32_t eraw;
        asm volatile("mov.u32 %0, %1;\n" : "=r"(eraw) : "r"(smem_u32(smem_raw)));
        const uint32_t esk = (eraw + 1023u) & ~1023u, esv = esk + C::KV_BYTES;
        named_bar_sync(BAR_MMA, 256);
        taca_bwd90::store_acc_rows<T, BN, DP>(esk, dk, a.scale, erow, elane);
        taca_bwd90::store_acc_rows<T, BN, DP>(esv, dv, 1.f, erow, elane);
        fence_proxy_async();  // the copy engine reads what stmatrix wrote
        named_bar_sync(2 + ewg, 128);
        const int row = ejt * BN + 64 * ewg;
        if ((etid & 127) == 0 && row < a.Nk) {
#pragma unroll
            for (int cb = 0; cb < DP / 64; ++cb) {
                const uint32_t off = cb * BN * 128 + ewg * 64 * 128;
                taca_bwd90::tma_store_4d(&p.tdk, esk + off, cb * 64, ws_coord(p.pos_dk, 1, row, ehk, eb),
                                         ws_coord(p.pos_dk, 2, row, ehk, eb), ws_coord(p.pos_dk, 3, row, ehk, eb));
                taca_bwd90::tma_store_4d(&p.tdv, esv + off, cb * 64, ws_coord(p.pos_dv, 1, row, ehk, eb),
                                         ws_coord(p.pos_dv, 2, row, ehk, eb), ws_coord(p.pos_dv, 3, row, ehk, eb));
            }
            bulk_commit();
            bulk_wait_read();  // the shared memory stays until the copy engine read it
        }
    } else if constexpr (G1) {
        const int r = ctaid_x_volatile() / a.nk;
        taca_bwd::store_dk_dv<T, DP / 8>(a, r / a.Hkv, r % a.Hkv, Nk, D, kr0, kr1, 0, t, dk, dv);
    } else {
        taca_bwd::store_dk_dv<T, DP / 8>(a, b, hk, Nk, D, kr0, kr1, 0, t, dk, dv);
    }
#else
    (void)p;
#endif
}

template <typename T, int DP, int BM, bool TW, bool G1 = false, bool PF = false, bool IX = false, bool DS = false,
          bool DF = false, bool D2 = false>
int launch(const BwdArgs &a, cudaStream_t stream) {
    using C = Cfg<DP, BM, TW, D2>;
    if (a.Np % BM != 0 || a.Np != a.nq * BM) return TACA_ERR_UNSUPPORTED;  // workspace layout
    const int64_t ctas = static_cast<int64_t>(a.nk) * a.Hkv * a.B;
    if (G1 && ctas > INT32_MAX) return TACA_ERR_UNSUPPORTED;
    // (PF unmasked only: with a mask's code ptxas spilled 8 bytes)
    if ((DS || DF) && a.nk == 1) return TACA_ERR_UNSUPPORTED;  // (DS / DF stage every tile; one key tile stores dQ directly)
    if (D2 && a.mask.data) return TACA_ERR_UNSUPPORTED;  // (its SMEM, with the masked kernel's static words, is too much)
    auto kernel = a.mask.data ? taca_bwd_sm90_v6_kernel<T, DP, BM, true, TW, G1, false>
                              : taca_bwd_sm90_v6_kernel<T, DP, BM, false, TW, G1, PF, IX, DS, DF, D2>;
    cudaFuncAttributes attr;
    TACA_CUDA_TRY(cudaFuncGetAttributes(&attr, kernel), "taca_bwd_cuda (sm90 v6): cudaFuncGetAttributes");
    if (attr.binaryVersion != 90) return TACA_ERR_UNSUPPORTED;
    V6Args p;
    memset(&p, 0, sizeof(p));
    p.a = a;
    p.a.acc_ld = C::ACC_LD;
    {
        const char *lead = getenv("TACA_BWD_V6_DFLEAD");  // DF's lead (a timing switch): on unless "0"
        p.df_lead = !(lead && !strcmp(lead, "0"));
    }
    {
        // the skew (item 10) where it applies, and the chains it runs (taca_bwd::apply_skew_rule)
        int sms = 0;
        if (device_sm_count(&sms, "taca_bwd_cuda (sm90 v6): SM count") != TACA_OK) sms = 0;
        taca_bwd::apply_skew_rule(&p.a, sms);
    }
    const BwdArgs &ac = p.a;  // (what the conversions read too)
    if (!encode_map<T>(&p.tq, p.pos_q, a.q, a.qs_n, a.qs_h, a.qs_b, a.N, a.H, a.B, a.D, BM) ||
        !encode_map<T>(&p.tdo, p.pos_do, a.dout, a.dos_n, a.dos_h, a.dos_b, a.N, a.H, a.B, a.D, BM))
        return TACA_ERR_UNSUPPORTED;  // nothing launched yet
    if (TW && a.nk > 1) {
        const int64_t rows = static_cast<int64_t>(a.nseg) * a.B * a.H * a.Np;
        if (rows > INT32_MAX || !encode_acc_map(&p.tacc, a.dq_acc, rows, DP, BM)) return TACA_ERR_UNSUPPORTED;
    }
    // dK / dV by TMA stores (every v6 kernel has both epilogues; its tile loop compiles exactly as without
    // this one, nvdisasm): the default, measured faster at D = 64 and 128 (KERNEL_LOG, fifteenth session);
    // the fragment stores where the maps cannot be encoded. TACA_BWD_V6_DKV=frag / tma forces one (a timing
    // switch, read per call).
    const char *dkv = getenv("TACA_BWD_V6_DKV");
    p.dkv_tma = !(dkv && !strcmp(dkv, "frag")) &&
                encode_map<T>(&p.tdk, p.pos_dk, a.dk, a.dks_n, a.dks_h, a.dks_b, a.Nk, a.Hkv, a.B, a.D, 64) &&
                encode_map<T>(&p.tdv, p.pos_dv, a.dv, a.dvs_n, a.dvs_h, a.dvs_b, a.Nk, a.Hkv, a.B, a.D, 64);
    TACA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM),
                  "taca_bwd_cuda (sm90 v6): cudaFuncSetAttribute");
    const int64_t rows = static_cast<int64_t>(a.B) * a.H * a.Np;
    int st = taca_bwd::launch_preprocess<T, DP>(a, stream, "taca_bwd_cuda (sm90 v6) preprocess");
    if (st != TACA_OK) return st;
    if (a.mode == taca_bwd::kAtomic && a.nk > 1) {  // (a.nseg buffers: 1, or the chains' with atomicseg)
        TACA_CUDA_TRY(cudaMemsetAsync(a.dq_acc, 0, static_cast<size_t>(a.nseg) * rows * C::ACC_LD * sizeof(float), stream),
                      "taca_bwd_cuda (sm90 v6) memset dq_acc");
    }
    const dim3 grid = G1 ? dim3(static_cast<unsigned>(ctas)) : dim3(a.nk, a.Hkv, a.B);
    kernel<<<grid, C::THREADS, C::SMEM, stream>>>(p);
    st = taca_cuda_check_launch("taca_bwd_cuda (sm90 v6) main");
    if (st != TACA_OK || a.nk == 1) return st;
    // the conversion as the main kernel's programmatic dependent (item 7)
    return taca_bwd::launch_dq_convert_after<T, DP, BM>(ac, stream, "taca_bwd_cuda (sm90 v6) dq convert",
                                                       "taca_bwd_cuda (sm90 v6) dq convert (tiles)");
}

template <int DP, int BM, bool TW>
int launch_dtype(const BwdArgs &a, cudaStream_t stream, bool bf16) {
    return bf16 ? launch<__nv_bfloat16, DP, BM, TW>(a, stream) : launch<__half, DP, BM, TW>(a, stream);
}

inline bool env_is(const char *name, const char *value) {
    const char *v = getenv(name);
    return v && !strcmp(v, value);
}

/* The default pair of a head dim (D = 72..128: the row writer; D = 64: the 1-D grid with the tensor writer) with
 * items 11-13 and 16, each behind a timing switch read per call: TACA_BWD_V6_PF=0 reads the span and lse2 / delta
 * where they are used (item 11 off, and 12, 13, 16 with it), TACA_BWD_V6_IX=0 divides the tile index (item 12 off,
 * 13 and 16 with it), item 13 (dQ staged at the next tile's top; more than one key tile, no mask) is on at
 * D = 72..128 unless TACA_BWD_V6_DS=0 and off at D = 64 unless TACA_BWD_V6_DS=1: backward alone on an H100, three
 * rounds one mode per process, -0.9 / -0.7 / -0.6% at FLUX 1024 b1 / b2 / 2048 b1, +2.0% at SD3.5-M CFG
 * (KERNEL_LOG, thirty-sixth session). Item 16 (DF: dQ's product itself at the next tile, no CTA barrier in the
 * loop) takes DS's place at D = 72..128 unless TACA_BWD_V6_DF=0 (then DS): -4.3% / -4.5% / -4.8% at FLUX 1024 b1 /
 * b2 / 2048 b1 against DS (H100, three rounds one mode per process; KERNEL_LOG, thirty-ninth session). */
template <typename T, int DP, int BM, bool TW, bool G1>
int launch_default(const BwdArgs &a, cudaStream_t stream) {
    if (env_is("TACA_BWD_V6_PF", "0")) return launch<T, DP, BM, TW, G1>(a, stream);
    if (env_is("TACA_BWD_V6_IX", "0")) return launch<T, DP, BM, TW, G1, true>(a, stream);
    const bool ds = DP == 128 ? !env_is("TACA_BWD_V6_DS", "0") : env_is("TACA_BWD_V6_DS", "1");
    if constexpr ((DP == 128 && !TW) || (DP == 64 && TW)) {  // item 16 (DF): dQ's product at the next tile
        // (in DS's place at D = 72..128 unless TACA_BWD_V6_DF=0; at D = 64 a switch, TACA_BWD_V6_DF=1)
        const bool df = DP == 128 ? ds && !env_is("TACA_BWD_V6_DF", "0") : env_is("TACA_BWD_V6_DF", "1");
        if constexpr (DP == 64) {  // D2 (DF with two dS' buffers): a switch, TACA_BWD_V6_D2=1
            if (env_is("TACA_BWD_V6_D2", "1") && a.nk > 1 && !a.mask.data)
                return launch<T, DP, BM, TW, G1, true, true, false, true, true>(a, stream);
        }
        if (df && a.nk > 1 && !a.mask.data) return launch<T, DP, BM, TW, G1, true, true, false, true>(a, stream);
    }
    if (ds && a.nk > 1 && !a.mask.data) return launch<T, DP, BM, TW, G1, true, true, true>(a, stream);
    return launch<T, DP, BM, TW, G1, true, true>(a, stream);
}

}  // namespace taca_bwd96

#if defined(TACA_BWD_TRACE)
/* The traces of the last v6 launches (diagnostic build only): bytes <= sizeof g_trace (per CTA) or
 * g_trace_tiles (per tile) copied to dst (host memory), or both zeroed. 0 on success, else the CUDA
 * error. */
extern "C" int taca_bwd_trace_read(void *dst, size_t bytes) {
    if (bytes > sizeof(taca_bwd96::g_trace)) bytes = sizeof(taca_bwd96::g_trace);
    return static_cast<int>(cudaMemcpyFromSymbol(dst, taca_bwd96::g_trace, bytes));
}
extern "C" int taca_bwd_trace_read_tiles(void *dst, size_t bytes) {
    if (bytes > sizeof(taca_bwd96::g_trace_tiles)) bytes = sizeof(taca_bwd96::g_trace_tiles);
    return static_cast<int>(cudaMemcpyFromSymbol(dst, taca_bwd96::g_trace_tiles, bytes));
}
extern "C" int taca_bwd_trace_reset(void) {
    void *ptr = nullptr;
    cudaError_t e = cudaGetSymbolAddress(&ptr, taca_bwd96::g_trace);
    if (e == cudaSuccess) e = cudaMemset(ptr, 0, sizeof(taca_bwd96::g_trace));
    if (e == cudaSuccess) e = cudaGetSymbolAddress(&ptr, taca_bwd96::g_trace_tiles);
    if (e == cudaSuccess) e = cudaMemset(ptr, 0, sizeof(taca_bwd96::g_trace_tiles));
    return static_cast<int>(e == cudaSuccess ? cudaDeviceSynchronize() : e);
}
#endif

/* TACA_ERR_UNSUPPORTED when v6 does not apply (the caller then takes v5 or mma.sync). */
int taca_bwd_sm90_v6(const taca_bwd::BwdArgs &a, cudaStream_t stream, bool bf16) {
#if defined(TACA_HAVE_SM90A)
    // (TACA_BWD_MODE=skipdq, a timing diagnostic, is v5's only)
    if ((a.D != 64 && (a.D < 72 || a.D > 128)) || !a.vec_load || a.mode == taca_bwd::kSkip)
        return TACA_ERR_UNSUPPORTED;
    const int dev_st = taca_sm90::device_is_sm90("taca_bwd_cuda (sm90 v6): device query");
    if (dev_st != TACA_OK) return dev_st;
    // The tensor writer at D = 64 (its 128-row tiles took 128 row operations each: the MMA warps
    // waited for free staging buffers), the row writer at D = 72..128 (the tensor one 5.3-5.7% slower
    // there, across processes). TACA_BWD_V6_WRITER=rows / tensor forces one (a timing switch, read per call).
    const char *wr = getenv("TACA_BWD_V6_WRITER");
    const bool tw = wr ? !strcmp(wr, "tensor") : a.D == 64;
    if (a.D == 64) {
        // The 1-D grid with the tensor writer (the default pair at D = 64): 1-2% faster than the
        // 3-D grid on an H200 (KERNEL_LOG, eleventh session; 1.6% across processes, fourteenth; its
        // tile loop is scheduled differently, the work is the same). TACA_BWD_V6_GRID=3d forces the
        // 3-D grid (a timing switch, read per call).
        // Items 11 (the span only: not lse2 / delta at BM = 128) to 13 in this default pair.
        if (tw && !taca_bwd96::env_is("TACA_BWD_V6_GRID", "3d"))
            return bf16 ? taca_bwd96::launch_default<__nv_bfloat16, 64, 128, true, true>(a, stream)
                        : taca_bwd96::launch_default<__half, 64, 128, true, true>(a, stream);
        return tw ? taca_bwd96::launch_dtype<64, 128, true>(a, stream, bf16)
                  : taca_bwd96::launch_dtype<64, 128, false>(a, stream, bf16);
    }
    if (tw) return taca_bwd96::launch_dtype<128, 64, true>(a, stream, bf16);
    // the row writer: items 11 (the span and each tile's lse2 / delta read ahead) to 13
    return bf16 ? taca_bwd96::launch_default<__nv_bfloat16, 128, 64, false, false>(a, stream)
                : taca_bwd96::launch_default<__half, 128, 64, false, false>(a, stream);
#else
    (void)a; (void)stream; (void)bf16;
    return TACA_ERR_UNSUPPORTED;
#endif
}
