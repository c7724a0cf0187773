/*
 * taca_fwd_sm90_ws.cuh: warp-specialized Hopper forward for D = 128 and D = 64 (the default at
 * both, and variants 10..12 of taca_fwd_sm90.cu); included by that file only.
 *
 * Same math and outputs as taca_fwd_sm90_kernel; what differs is who loads and who waits:
 *   CTA = 3 warpgroups, 384 threads, BR = 128 query rows, BC = 128-key tiles (WsCfg's NC = 3: 4 warpgroups,
 *   512 threads, BR = 192, three consumers taking turns round robin; the default at D = 64).
 *   warpgroup 0 (producer): setmaxnreg down to 24; one thread issues TMA tile loads
 *     (cuTensorMapEncodeTiled maps, 128B swizzle done by the copy engine, rows >= n zero-filled)
 *     of Q once and of K_j, V_j into a ring of STAGES buffers each, gated by per-buffer
 *     mbarriers: full (TMA bytes landed) and empty (all 8 consumer warps done reading).
 *   warpgroups 1, 2 (consumers, setmaxnreg up to 240): rows [64c, 64c + 64) of the tile. Per
 *     key tile j, under a two-warpgroup turn (named barriers 1 and 2, strict alternation):
 *       issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} as one wgmma group, pass the turn,
 *       wait, release K_j and V_{j-1}, softmax of S_j (rescales O), pack P_j.
 *     So one warpgroup's softmax runs while the other's two products run on the tensor cores
 *     (FA3's ping-pong); no CTA-wide barrier inside the loop. Options (WsCfg): OVERLAP starts
 *     the softmax once S_j landed, with P_{j-1} V_{j-1} still running (O rescaled after it);
 *     PINGPONG off drops the turns.
 * The epilogue is the v4 one (each warp stages its own 16 rows of O in the Q tile).
 * PERSIST (the default, WsCfg): a grid of min(items, SMs) CTAs, each walking the items
 * w = query tile + tiles * (head + heads * batch) from blockIdx.x in steps of gridDim.x; the K / V
 * ring position and the ping-pong turns continue across items, Q has two buffers (full / empty
 * mbarriers; the consumers release one after the epilogue that staged O in it, with a proxy fence
 * before the copy engine's next load), and the final V tile of an item is released too. So the next
 * item's Q and first K / V loads run under this item's last products and epilogue instead of a CTA
 * launch, barrier set-up and pipeline fill per item. H200 (KERNEL_LOG, ninth session): SD3.5-M cfg
 * 0.628 -> 0.606 ms, SD3.5-L cfg 1.001 -> 0.979, FLUX 1024 b1 0.434 -> 0.430 (one A/B round).
 */
#ifndef TACA_FWD_SM90_WS_CUH_
#define TACA_FWD_SM90_WS_CUH_

#include <string.h>

namespace taca_fwd90 {

template <int STAGES_, bool OVERLAP_, bool PINGPONG_, int DP_ = 128, bool PERSIST_ = false, int BC_ = 128, int NC_ = 2,
          int FORM_ = 0>
struct WsCfg {
    // DP: 128 or 64. BC: keys per tile: 128 in the defaults; at D = 64 variant 18 (two consumers) picks 128, 160 or
    // 192 by key count (d64_key_tile, taca_fwd_sm90.cu); fewer tiles amortize each tile's softmax bookkeeping and
    // turn hand-offs over more products (FA3 takes 176 at D = 128; here wider tiles were slower on FLUX, KERNEL_LOG).
    // NC: consumer warpgroups of 64 rows each (2; 3 = FA3's 192-row CTAs, the D = 64 default: with three the
    // softmax chains of two overlap the third's products; 160 registers a consumer thread instead of 240)
    static constexpr int NC = NC_;
    static constexpr int DP = DP_, BC = BC_, BR = 64 * NC, STAGES = STAGES_;
    static constexpr int CONS_REG = NC == 2 ? 240 : 160;
    // OVERLAP: softmax of S_j starts once S_j landed, while P_{j-1} V_{j-1} still runs (FA3's
    // intra-warpgroup overlap); O is rescaled after that product landed.
    static constexpr bool OVERLAP = OVERLAP_;
    static constexpr bool PINGPONG = PINGPONG_;  // the two consumers take turns issuing products
    // FORM (timing switches of the D = 128 default, fwd_form; 0 the default), bits:
    // PVW (1, D = 128): P V as one m64n128k16 per 16 keys over both 64-column blocks of V (an N-major descriptor whose
    //   leading byte offset steps between the blocks, as the backward's dV product) instead of two m64n64k16: 8 wgmmas
    //   a tile instead of 16, each P fragment sent once (cuDNN's and FA3's form)
    // IL (2; built only with LZ): uniform tiles (text or visual keys only) by softmax_uniform_il, one path for
    //   both kinds, with O's rescale and P's packing between the exponentials in the source (in the default they were
    //   merged after the tile kinds' join, and ran after the last exponential: KERNEL_LOG fortieth session)
    static constexpr int FORM = FORM_;
    // LZ (4, with IL): uniform tiles keep the running max unless a row of the warp grows by more than 2^8
    //   (softmax_uniform_il's LAZY, FlashAttention-4's rule): most tiles then skip O's rescale. Not bitwise the default
    // TURN (8; persistent ping-pong forms): the consumers' turn continues across a CTA's items: the last consumer passes
    //   it to consumer 0 once its last P V product of an item is issued, when the CTA has another (whole) item, so
    //   consumer 0 starts that item while this one's last product and epilogue run. Without it consumer 0 gets its first
    //   turn of the next item only once the last consumer has finished this item, epilogue included (at
    //   FlashAttention-3's 4k-token shapes the D = 128 forward ran 4% under its 16k rate, whose items are four times as
    //   long: about 3 us an item)
    static constexpr bool PVW = (FORM & 1) != 0, IL = (FORM & 2) != 0, LZ = (FORM & 4) != 0, TURN = (FORM & 8) != 0;
    static_assert(!LZ || IL, "the lazy max: the IL path's");
    static_assert(FORM >= 0 && FORM < 16, "FORM: the PVW, IL, LZ and TURN bits");
    // PERSIST: one CTA per SM walks the (query tile, head, batch) items; two Q buffers, so the next
    // item's Q and first K / V tiles load during this item's last products and epilogue
    static constexpr bool PERSIST = PERSIST_;
    static constexpr int NQBUF = PERSIST ? 2 : 1;
    static_assert(!TURN || (PERSIST && PINGPONG), "the turn across items: the persistent ping-pong forms");
    static constexpr int THREADS = 128 * (NC + 1);
    static constexpr int NT = BC / 8, DT = DP / 8;
    static constexpr uint32_t Q_BYTES = BR * DP * 2;
    static constexpr uint32_t KV_BYTES = BC * DP * 2;
    static constexpr size_t SMEM = NQBUF * Q_BYTES + 2 * STAGES * KV_BYTES + 1024;  // + alignment slack
    // MK_KEY: 2 x STAGES slots of a key tile's mask terms (BC floats) and its "every key attends" flag
    static constexpr int KT_SLOTS = 2 * STAGES;
    static constexpr size_t KT_BYTES = KT_SLOTS * (BC * 4 + 16);
    static_assert(DP == 64 || DP == 128 || DP == 256, "head dim");
    static_assert(!PVW || DP == 128, "the wide P V product: D = 128");
    static_assert(NC == 2 || (NC == 3 && PERSIST && PINGPONG && !OVERLAP), "three consumers: the persistent ping-pong form");
    static_assert(BC % 32 == 0 && BC <= 256, "key tile: a multiple of 32 keys (the key-mask terms), at most 256");
    static_assert(SMEM <= 232448, "shared memory");
};

/* The mask code an instance carries: none; a key mask (mask.q == 0: the same for every query row) as
 * per-tile terms; any mask read per element (a key mask is still voted per tile there, its unmasked tiles
 * taking the plain paths; TACA_FWD_MASK=elem sends key masks here). FEAT (per-sample spans) without a mask takes MK_NONE: its tile
 * loop is then the plain instance's (the per-element path inside the loop made the whole loop slower,
 * KERNEL_LOG 2026-12-04, sixteenth session). */
enum { MK_NONE = 0, MK_KEY = 1, MK_ANY = 2 };

/* Kernel parameters: the three TMA maps (64-byte aligned, in parameter space) and, for each map,
 * which of its dimensions 1..3 holds (row, head, batch). */
struct WsArgs {
    CUtensorMap tq, tk, tv;
    FwdArgs a;
    int pos_q[3], pos_k[3], pos_v[3];
    int heads, items;  // PERSIST: query heads, and items = query tiles x heads x batch
    // SPLIT (the tail split, fwd_split_plan): units w < split_first are whole items as before; the split_tail items
    // from split_item0 on each run as split_parts key ranges (units w = split_first + tail item + split_tail x part),
    // merged by the range that finishes last (split_tickets: one counter per tail item and consumer warp; split_ws:
    // each range's O, m, l, t). One launch: split_first = split_item0 = the whole items; two launches (the whole
    // items by the default instance first): split_first = 0
    // split_range (TACA_FWD_SPLIT=range): the tail's key tiles (tail x nkv) cut into one contiguous range per CTA
    // (stream-K over the tail), each CTA's range in at most two units (units w = split_first + CTA and + CTA + SMs),
    // an item merged from the 1..split_parts ranges that cover it
    float *split_ws;
    int *split_tickets;
    int split_first, split_tail, split_parts, split_item0, split_range;
};

/* SPLIT: one key range of a tail item is done; its consumer warp stores the range's state (O unnormalized, running
 * max, sums, text mass: the thread's own values, float4 k of thread ct at split_ws[((unit) * K4 + k) * 256 + ct]) and
 * counts itself on the item's ticket. The warp that counts last (the other ranges' warps stored theirs before they
 * counted: __threadfence, atomicAdd) merges every range's state, its own included, in range order 0, 1, .. into
 * o / m / l / t (the same operations whichever range came last: the output does not depend on the order the ranges
 * finished) and returns true: it then writes the rows as a whole item would. The others return false. */
template <int DT>
__device__ __forceinline__ bool split_merge(const WsArgs &p, int t, int part, int P, int ct, int cw, int lane,
                                            float (&o)[1][DT][4], float (&m_run)[1][2], float (&l_run)[1][2],
                                            float (&t_run)[1][2]) {
    constexpr int K4 = DT + 2;  // O as DT float4, then (m0, m1, l0, l1) and (t0, t1, 0, 0)
    const int slots = p.split_parts;  // state slots per tail item; P (<= slots) of them used by item t
    float4 *const ws = reinterpret_cast<float4 *>(p.split_ws);
    float4 *const mine = ws + static_cast<int64_t>(t * slots + part) * K4 * 256 + ct;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) mine[dt * 256] = make_float4(o[0][dt][0], o[0][dt][1], o[0][dt][2], o[0][dt][3]);
    mine[DT * 256] = make_float4(m_run[0][0], m_run[0][1], l_run[0][0], l_run[0][1]);
    mine[(DT + 1) * 256] = make_float4(t_run[0][0], t_run[0][1], 0.0f, 0.0f);
    __threadfence();  // this thread's state before the warp's count (threadFenceReduction's pattern, per warp)
    __syncwarp();
    int before = 0;
    if (lane == 0) {
        before = atomicAdd(p.split_tickets + t * 8 + cw, 1);
        __threadfence();  // the count before the reads below
    }
    before = __shfl_sync(0xffffffffu, before, 0);
    if (before != P - 1) return false;
    __syncwarp();  // every range counted: their states are visible (read past L1: __ldcg)
    // Two passes, so that no load waits on the one before (a chain of P rescalings was P L2 round trips): the rows'
    // max over the ranges, then O, l, t as sums over r = 0, 1, .. of exp2(m_r - max) times range r's (one fixed order)
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll 4
    for (int r = 0; r < P; ++r) {
        const float4 ml = __ldcg(ws + (static_cast<int64_t>(t * slots + r) * K4 + DT) * 256 + ct);
        mx[0] = fmaxf(mx[0], ml.x);
        mx[1] = fmaxf(mx[1], ml.y);
    }
    const float base[2] = {mx[0] == -INFINITY ? 0.0f : mx[0], mx[1] == -INFINITY ? 0.0f : mx[1]};
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[0][dt][0] = o[0][dt][1] = o[0][dt][2] = o[0][dt][3] = 0.0f;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) m_run[0][hf] = mx[hf], l_run[0][hf] = 0.0f, t_run[0][hf] = 0.0f;
    for (int r = 0; r < P; ++r) {
        const float4 *const src = ws + static_cast<int64_t>(t * slots + r) * K4 * 256 + ct;
        const float4 ml = __ldcg(src + DT * 256), tt = __ldcg(src + (DT + 1) * 256);
        const float w0 = fast_exp2(ml.x - base[0]), w1 = fast_exp2(ml.y - base[1]);
        l_run[0][0] += ml.z * w0;
        l_run[0][1] += ml.w * w1;
        t_run[0][0] += tt.x * w0;
        t_run[0][1] += tt.y * w1;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            const float4 x = __ldcg(src + dt * 256);
            o[0][dt][0] += x.x * w0;
            o[0][dt][1] += x.y * w0;
            o[0][dt][2] += x.z * w1;
            o[0][dt][3] += x.w * w1;
        }
    }
    return true;
}


/* KTA (MK_KEY only; instances of their own, the key-mask default since the twenty-sixth session; TACA_FWD_KT_ARRIVE=
 * lane0 takes the others): every producer lane arrives on full_k after its key-term stores and every consumer thread
 * on empty_k, instead of lane 0 after a __syncwarp / lane 0 of each consumer warp. The same protocol and outputs;
 * compute-sanitizer racecheck does not model __syncwarp-ordered lane-0 arrivals (the backward's ring needed
 * every-thread arrivals to check clean) and reported 20 hazards on the reused key-term slots of the lane-0 MK_KEY
 * instances, two and three consumers alike; the KTA instances check clean (KERNEL_LOG twenty-fourth and twenty-sixth
 * sessions). */
template <typename T, typename C, bool FEAT, int MK, bool KTA = false, bool SPLIT = false>
__global__ void __launch_bounds__(C::THREADS, 1) taca_fwd_sm90_ws_kernel(const __grid_constant__ WsArgs p) {
#if TACA_SM90A
    static_assert(!SPLIT || (C::PERSIST && C::NC == 2 && (MK == MK_NONE || (MK == MK_KEY && KTA))),
                  "the tail split: the two-consumer persistent form, without a mask or with a key mask's terms");
    constexpr int DP = C::DP, BC = C::BC, BR = C::BR, NT = C::NT, DT = C::DT, STAGES = C::STAGES;
    constexpr int BAR_TURN = 1;  // named barriers 1, 2: consumer 0's and consumer 1's turn
    constexpr bool PER = C::PERSIST;
    const FwdArgs &a = p.a;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Q full [NQBUF], Q empty [NQBUF] (PERSIST), full K, full V, empty K, empty V
    __shared__ __align__(8) uint64_t bars[2 * C::NQBUF + 4 * STAGES];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sq = (raw + 1023u) & ~1023u;      // NQBUF Q buffers
    unsigned char *const smem = smem_raw + (sq - raw);
    const uint32_t sk = sq + C::NQBUF * C::Q_BYTES;  // STAGES K buffers
    const uint32_t sv = sk + STAGES * C::KV_BYTES;   // STAGES V buffers
    // MK_KEY: KT_SLOTS x BC key terms, then KT_SLOTS flags (dynamic shared memory past the V buffers)
    float *const kterm = reinterpret_cast<float *>(smem + (sv + STAGES * C::KV_BYTES - sq));
    int *const kflag = reinterpret_cast<int *>(kterm + C::KT_SLOTS * BC);
    const uint32_t bar0 = smem_u32(&bars[0]);
    auto full_q = [&](int qb) { return bar0 + 8u * qb; };
    auto empty_q = [&](int qb) { return bar0 + 8u * (C::NQBUF + qb); };
    auto full_k = [&](int s) { return bar0 + 8u * (2 * C::NQBUF + s); };
    auto full_v = [&](int s) { return bar0 + 8u * (2 * C::NQBUF + STAGES + s); };
    auto empty_k = [&](int s) { return bar0 + 8u * (2 * C::NQBUF + 2 * STAGES + s); };
    auto empty_v = [&](int s) { return bar0 + 8u * (2 * C::NQBUF + 3 * STAGES + s); };

    const int tid = threadIdx.x, wg = tid >> 7;
    const int n = a.n, nk = a.nk;
    const int nkv = (nk + BC - 1) / BC;
    const int nqt = (n + BR - 1) / BR;
    const int heads = PER ? p.heads : static_cast<int>(gridDim.y);
    // Work items w = query tile + nqt * (head + heads * batch): PERSIST walks w = blockIdx.x,
    // + gridDim.x, ..; otherwise one item, the block's own (blockIdx = (tile, head, batch)).
    const int w0 = PER ? static_cast<int>(blockIdx.x) : 0;
    const int wend = !PER ? 1
                     : SPLIT ? p.split_first + (p.split_range ? 2 * static_cast<int>(gridDim.x) : p.split_tail * p.split_parts)
                             : p.items;
    const int wstep = PER ? static_cast<int>(gridDim.x) : 1;
    auto decode = [&](int w, int &qt, int &h, int &b) {
        if (PER) {
            qt = w % nqt;
            const int r = w / nqt;
            h = r % heads;
            b = r / heads;
        } else {
            qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
        }
    };
    // SPLIT: unit w's tail item t (-1: a whole item), key tiles [jb, je) (empty: no unit), and the item's range
    // index (part) and range count (np)
    auto split_unit = [&](int w, int &t, int &jb, int &je, int &part, int &np) {
        t = -1, jb = 0, je = nkv, part = 0, np = 1;
        if (!SPLIT || w < p.split_first) return;
        const int u = w - p.split_first;
        if (!p.split_range) {
            part = u / p.split_tail, np = p.split_parts;
            t = u - part * p.split_tail;
            jb = part * nkv / np;
            je = (part + 1) * nkv / np;
            return;
        }
        // range form: CTA cta's tiles [lo, hi) of the tail's tail x nkv (tail item t, tile j at t x nkv + j), at
        // most two units: k = 0 the part in item lo / nkv, k = 1 the rest (in the next item) or nothing
        const int S = static_cast<int>(gridDim.x), cta = u % S, k = u / S;
        const int64_t U = static_cast<int64_t>(p.split_tail) * nkv;
        const int64_t lo = cta * U / S, hi = (cta + 1) * U / S;
        const int t1 = static_cast<int>(lo / nkv);
        t = t1 + k;
        const int64_t ib = static_cast<int64_t>(t) * nkv;  // item t's first tile
        jb = k == 0 ? static_cast<int>(lo - ib) : 0;
        je = static_cast<int>((hi < ib + nkv ? hi : ib + nkv) - ib);
        if (k == 1 && hi <= ib) jb = je = 0;  // the range ended in item t1
        // the ranges (CTAs) covering item t: c(x) = the CTA whose range holds tile x = ((x + 1) S - 1) / U
        const int ca = static_cast<int>(((ib + 1) * S - 1) / U), cb = static_cast<int>(((ib + nkv) * S - 1) / U);
        part = cta - ca, np = cb - ca + 1;
    };
    // unit w's item (qt, h, b) and key tiles [jb, je) (without SPLIT: item w, every key tile); false: an empty unit
    // (SPLIT's range form only, a CTA's last), which the producer and the consumers both skip
    auto decode_unit = [&](int w, int &qt, int &h, int &b, int &jb, int &je) {
        if constexpr (SPLIT) {
            int t, part, np;
            split_unit(w, t, jb, je, part, np);
            decode(t < 0 ? w : p.split_item0 + t, qt, h, b);
            return jb < je;
        } else {
            decode(w, qt, h, b);
            jb = 0, je = nkv;
            return true;
        }
    };

    if (tid == 0) {
        for (int qb = 0; qb < C::NQBUF; ++qb) {
            mbar_init(full_q(qb), 1);
            mbar_init(empty_q(qb), 128 * C::NC);  // every consumer thread after its epilogue (PERSIST)
        }
        constexpr bool all = MK == MK_KEY && KTA;
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_k(s), all ? 32 : 1);              // (all: every producer lane)
            mbar_init(full_v(s), 1);
            mbar_init(empty_k(s), all ? 128 * C::NC : 4 * C::NC);  // lane 0 of each consumer warp (all: every thread)
            mbar_init(empty_v(s), 4 * C::NC);
        }
        mbar_init_fence();
    }
    __syncthreads();

    // The producer's TMA issue, by one thread: the three maps' descriptors; item i's Q into buffer qb once item
    // i - NQBUF's consumers released it (PERSIST); K, then V, into ring slot s (round r; the caller waited for K's
    // release, since the key-mask form publishes the slot's terms with full_k)
    auto prefetch_maps = [&]() {
        tma_prefetch_desc(&p.tq);
        tma_prefetch_desc(&p.tk);
        tma_prefetch_desc(&p.tv);
    };
    auto issue_q = [&](int i, int qb, int q0, int h, int b) {
        if (PER && i >= C::NQBUF) mbar_wait(empty_q(qb), ((i / C::NQBUF) - 1) & 1);
        mbar_arrive_expect_tx(full_q(qb), C::Q_BYTES);
        tma_load_tile<DP, BR>(sq + qb * C::Q_BYTES, &p.tq, p.pos_q, full_q(qb), q0, h, b);
    };
    auto issue_kv = [&](int s, int r, int row, int hk, int b) {
        const uint32_t off = s * C::KV_BYTES;
        mbar_arrive_expect_tx(full_k(s), C::KV_BYTES);
        tma_load_tile<DP, BC>(sk + off, &p.tk, p.pos_k, full_k(s), row, hk, b);
        if (r > 0) mbar_wait(empty_v(s), (r - 1) & 1);
        mbar_arrive_expect_tx(full_v(s), C::KV_BYTES);
        tma_load_tile<DP, BC>(sv + off, &p.tv, p.pos_v, full_v(s), row, hk, b);
    };

    if (wg == 0) {
        setmaxnreg_dec<24>();
        if constexpr (MK == MK_KEY) {
            // The producer warp reads a key mask: for each K tile, every lane converts the terms of keys k0 + lane
            // + 32 i, stores them in the tile's slot (jg % KT_SLOTS) and the warp votes whether every key attends;
            // lane 0 stores the flag and only then issues the tile's K load, so the full_k barrier that the
            // consumers wait on also publishes the slot. Slot jg was last read in tile jg - KT_SLOTS's softmax,
            // which every consumer finished before releasing K tile jg - STAGES (waited on here first).
            // The raw elements (bool bytes or float bits) of tile j + 1 are loaded right after tile j's K / V loads
            // were issued and converted only when tile j + 1's slot is written: no K load waits on a mask load
            // (the form that loaded them just before each K load ran 3-4% slower, KERNEL_LOG seventeenth session).
            if (tid < 32) {
                const int lane = tid;
                if (lane == 0) prefetch_maps();
                const bool mbool = a.mask.kind == TACA_MASK_BOOL;
                const int64_t mesz = mbool ? 1 : 4, mstep = (int64_t)32 * a.mask.k * mesz;  // key c -> c + 32
                uint32_t kr[BC / 32];
                auto read_raw = [&](const char *pl, int k0) {  // pl: this lane's element of key k0 + lane
                    if (mbool) {
#pragma unroll
                        for (int i2 = 0; i2 < BC / 32; ++i2) {
                            kr[i2] = 1u;  // past nk: attends (a zero term; those columns are -inf already)
                            if (k0 + lane + 32 * i2 < nk) kr[i2] = *reinterpret_cast<const uint8_t *>(pl + i2 * mstep);
                        }
                    } else {
#pragma unroll
                        for (int i2 = 0; i2 < BC / 32; ++i2) {
                            kr[i2] = 0u;
                            if (k0 + lane + 32 * i2 < nk) kr[i2] = *reinterpret_cast<const uint32_t *>(pl + i2 * mstep);
                        }
                    }
                };
                int jg = 0;
                for (int w = w0, i = 0; w < wend; w += wstep, ++i) {
                    int qt, h, b, jb, je;
                    if (!decode_unit(w, qt, h, b, jb, je)) continue;
                    const int q0 = qt * BR, hk = h / a.group, qb = i % C::NQBUF;
                    const char *const mlane = static_cast<const char *>(a.mask.data) +
                                              ((int64_t)b * a.mask.b + (int64_t)h * a.mask.h + (int64_t)lane * a.mask.k) * mesz;
                    read_raw(mlane + (int64_t)jb * BC * a.mask.k * mesz, jb * BC);  // lands during the Q buffer's wait
                    if (lane == 0) issue_q(i, qb, q0, h, b);
                    for (int j = jb; j < je; ++j, ++jg) {
                        const int s = jg % STAGES, r = jg / STAGES, row = j * BC;
                        if (r > 0) mbar_wait(empty_k(s), (r - 1) & 1);  // every lane: the slot is free
                        float *const kt = kterm + (jg % C::KT_SLOTS) * BC;
                        bool ok = true;
#pragma unroll
                        for (int i2 = 0; i2 < BC / 32; ++i2) {  // the terms mask_log2 gives, from the raw elements
                            const float t = mbool ? (kr[i2] ? 0.0f : -INFINITY) : __uint_as_float(kr[i2]) * 1.4426950408889634f;
                            kt[lane + 32 * i2] = t;
                            ok = ok && t == 0.0f;
                        }
                        ok = __all_sync(0xffffffffu, ok);
                        __syncwarp();  // the lanes' stores ordered before lane 0's arrive below
                        if (KTA && lane != 0) mbar_arrive(full_k(s));  // (lane 0's: issue_kv's expect_tx)
                        if (lane == 0) {
                            kflag[jg % C::KT_SLOTS] = ok;
                            issue_kv(s, r, row, hk, b);  // full_k's arrive also releases the slot's stores
                        }
                        if (j + 1 < je) read_raw(mlane + (int64_t)(row + BC) * a.mask.k * mesz, row + BC);
                        __syncwarp();
                    }
                }
            }
            return;
        }
        if (tid == 0) {
            prefetch_maps();
            int jg = 0;  // K / V tiles issued so far: the ring position continues across items
            for (int w = w0, i = 0; w < wend; w += wstep, ++i) {
                int qt, h, b, jb, je;
                if (!decode_unit(w, qt, h, b, jb, je)) continue;
                const int q0 = qt * BR, hk = h / a.group, qb = i % C::NQBUF;
                issue_q(i, qb, q0, h, b);  // Q buffer qb: free once every consumer finished item i - 2's epilogue
                for (int j = jb; j < je; ++j, ++jg) {
                    const int s = jg % STAGES, r = jg / STAGES;
                    if (r > 0) mbar_wait(empty_k(s), (r - 1) & 1);
                    issue_kv(s, r, j * BC, hk, b);
                }
            }
        }
        return;
    }
    setmaxnreg_inc<C::CONS_REG>();

    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
    const int wrow0 = c * 64 + warp * 16;  // this warp's first row in the CTA tile
    auto pv_product = [](float (&o_)[1][DT][4], const uint32_t (&p_)[BC / 16][4], uint32_t vbuf) {
        if constexpr (C::PVW) {  // both column blocks (BC x 64 each, BC * 128 bytes apart) in one product
            const uint64_t d_v = desc_sw128_mn(vbuf, BC * 128);
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk)
                wgmma_rs<T, 128, 1>(&o_[0][0][0], p_[kk], desc_advance(d_v, kk * 16 * 128), 1);
        } else {
            const uint64_t d_v = desc_sw128(vbuf);  // advanced per k-step (desc_advance)
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk)
#pragma unroll
                for (int hb = 0; hb < DP / 64; ++hb)
                    wgmma_rs<T, 64, 1>(&o_[0][hb * 8][0], p_[kk], desc_advance(d_v, hb * BC * 128 + kk * 16 * 128), 1);
        }
    };

    int jbase = 0;  // ring position of the item's first K / V tile
    // SPLIT: the unit's key tiles. Without SPLIT jb / je stay per-item constants below (as loop-carried variables
    // they moved every default kernel's tile loop in SASS)
    int ujb = 0, uje = nkv;
    for (int w = w0, i = 0; w < wend; w += wstep, ++i, jbase += SPLIT ? uje - ujb : nkv) {
        int qt, h, b;
        if constexpr (SPLIT) {
            if (!decode_unit(w, qt, h, b, ujb, uje)) continue;  // as the producer
        } else {
            decode(w, qt, h, b);
        }
        const int jb = SPLIT ? ujb : 0, je = SPLIT ? uje : nkv;
        const int q0 = qt * BR, qb = i % C::NQBUF;
        const uint32_t sqb = sq + qb * C::Q_BYTES;
        unsigned char *const smem_q = smem + qb * C::Q_BYTES;  // generic pointer to Q buffer qb
        const Span sp = FEAT ? span_of(a.spans, b, a.tb, a.te, a.qtb, a.qte) : Span{a.tb, a.te, a.qtb, a.qte};
        const int tb = sp.kb, te = sp.ke;
        const float g = a.gamma[b];
        float mul_txt[1][2], mul_vis[1][2], o[1][DT][4], m_run[1][2], l_run[1][2], t_run[1][2];
        init_row_state<DT>(a, g, sp.qb, sp.qe, q0, wrow0, lane, mul_txt, mul_vis, o, m_run, l_run, t_run);

        const uint32_t q_wg = sqb + c * 64 * 128;  // this warpgroup's 64 rows inside each column block
        const uint64_t d_qw = desc_sw128(q_wg);    // advanced per k-step (desc_advance)

        mbar_wait(full_q(qb), (i / C::NQBUF) & 1);
        // consumer 0 takes the first turn: of every item, or with TURN of the CTA's first (and of the split's tail
        // units), the last consumer passing it on at the end of each (whole) item that has a successor (below)
        if (C::PINGPONG && c == C::NC - 1 && (!C::TURN || w == w0 || (SPLIT && w >= p.split_first)))
            named_bar_arrive(BAR_TURN + 0, 256);
        uint32_t pa[BC / 16][4];  // P of the previous tile, A operand of its P V product
        const int64_t mbase = MK ? (int64_t)b * a.mask.b + (int64_t)h * a.mask.h : 0;
        // One key tile j (ring position jbase + j); FIRST (tile 0) has no previous P V. Two instances so
        // no wgmma is issued on a branch (ptxas serializes wgmma around divergent issue).
        auto tile = [&](const int j, auto first) {
            constexpr bool FIRST = decltype(first)::value;
            const int jg = jbase + (j - jb);
            const int k0 = j * BC, s = jg % STAGES, sp = (jg + STAGES - 1) % STAGES;
            mbar_wait(full_k(s), (jg / STAGES) & 1);
            if (!FIRST) mbar_wait(full_v(sp), ((jg - 1) / STAGES) & 1);
            if (C::PINGPONG) named_bar_sync(BAR_TURN + c, 256);

            float sacc[1][NT][4];
            fence_regs<DT * 4>(&o[0][0][0]);
            fence_regs<BC / 4>(&pa[0][0]);
            const uint64_t d_kj = desc_sw128(sk + s * C::KV_BYTES);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < DP / 16; ++kk) {
                const uint32_t koff = (kk & 3) * 32;  // 16 columns = 32 B inside a 128 B row
                wgmma_ss<T, BC, 0, 0>(&sacc[0][0][0], desc_advance(d_qw, (kk >> 2) * BR * 128 + koff),
                                      desc_advance(d_kj, (kk >> 2) * BC * 128 + koff), kk > 0);
            }
            wgmma_commit();  // group: S_j
            if constexpr (!FIRST) {
                pv_product(o, pa, sv + sp * C::KV_BYTES);
                wgmma_commit();  // group: P_{j-1} V_{j-1}
            }
            // pass the turn; consumer 1's last pass would have no taker (consumer 0 is done)
            if constexpr (C::NC == 2) {
                if (C::PINGPONG && (c == 0 || j + 1 < je)) named_bar_arrive(BAR_TURN + (1 - c), 256);
            } else {  // round robin: the last consumer's last pass would have no taker
                if (c + 1 < C::NC || j + 1 < je) named_bar_arrive(BAR_TURN + (c + 1 < C::NC ? c + 1 : 0), 256);
            }
            constexpr bool LATE_O = C::OVERLAP && !FIRST;  // O and P still in flight during the softmax
            if constexpr (LATE_O) {
                wgmma_wait<1>();
            } else {
                wgmma_wait<0>();
                fence_regs<DT * 4>(&o[0][0][0]);
                fence_regs<BC / 4>(&pa[0][0]);
            }
            fence_regs<NT * 4>(&sacc[0][0][0]);
            if constexpr (MK == MK_KEY && KTA) {
                mbar_arrive(empty_k(s));  // every consumer thread
                if (lane == 0 && !FIRST && !LATE_O) mbar_arrive(empty_v(sp));
            } else if (lane == 0) {
                mbar_arrive(empty_k(s));
                if (!FIRST && !LATE_O) mbar_arrive(empty_v(sp));
            }

            const int k1 = k0 + BC;
            const int row0 = q0 + wrow0 + (lane >> 2);
            // a key mask (the same for every query) is voted per tile: unmasked tiles run as usual.
            // MK_KEY: the producer's vote and terms of this tile (its slot, published with full_k).
            const float *kt = MK == MK_KEY ? kterm + (jg % C::KT_SLOTS) * BC : nullptr;
            bool masked = false;
            if constexpr (MK == MK_ANY) {
                masked = a.mask.q != 0 || !keys_attend<BC>(a.mask, mbase, k0, nk, lane);
            } else if constexpr (MK == MK_KEY) {
                masked = !kflag[jg % C::KT_SLOTS];
            }
            float alpha[1][2];
            bool moved = true;   // LZ: whether O needs its rescale by alpha
            bool il_done = false;  // IL: a uniform tile, its softmax (and without LATE_O its packing) done
            if constexpr (C::IL) {
                const bool uni_vis = k1 <= tb || k0 >= te, uni_txt = k0 >= tb && k1 <= te;
                if (!masked && a.scale_log2 >= 0.0f && k1 <= nk && (uni_vis || uni_txt)) {
                    // the rows' multipliers selected as values (a reference to either array put both on the stack)
                    const float mu[1][2] = {{uni_vis ? mul_vis[0][0] : mul_txt[0][0], uni_vis ? mul_vis[0][1] : mul_txt[0][1]}};
                    moved = softmax_uniform_il<T, !LATE_O, NT, DT, C::LZ>(sacc, o, m_run, l_run, t_run, mu, !uni_vis, alpha,
                                                                          pa);
                    il_done = true;
                }
            }
            // (the default's chain verbatim: FORM 0's instances keep their SASS)
            if (il_done) {
            } else if (!masked && a.scale_log2 >= 0.0f && k1 <= nk && (k1 <= tb || k0 >= te))
                taca_fwd::softmax_tile<taca_fwd::TILE_VIS, !LATE_O>(sacc, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb, te, lane, alpha,
                                                                    a.mask, mbase, row0, n);
            else if (!masked && a.scale_log2 >= 0.0f && k1 <= nk && k0 >= tb && k1 <= te)
                taca_fwd::softmax_tile<taca_fwd::TILE_TXT, !LATE_O>(sacc, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb, te, lane, alpha,
                                                                    a.mask, mbase, row0, n);
            else if (MK == MK_KEY)  // a masked or mixed tile: the key terms (zero where nothing is masked)
                taca_fwd::softmax_tile<taca_fwd::TILE_MIXED, !LATE_O, false, MK == MK_KEY>(
                    sacc, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk, tb, te, lane, alpha, a.mask, mbase, row0, n, kt);
            else if (MK == MK_ANY)  // any mask, read per element
                taca_fwd::softmax_tile<taca_fwd::TILE_MIXED, !LATE_O, MK == MK_ANY>(sacc, o, m_run, l_run, t_run, mul_txt, mul_vis, k0,
                                                                                   nk, tb, te, lane, alpha, a.mask, mbase, row0, n);
            else
                taca_fwd::softmax_tile<taca_fwd::TILE_MIXED, !LATE_O, false>(sacc, o, m_run, l_run, t_run, mul_txt, mul_vis, k0, nk,
                                                                             tb, te, lane, alpha, a.mask, mbase, row0, n);
            if constexpr (LATE_O) {
                wgmma_wait<0>();  // P_{j-1} V_{j-1} landed: O and P are free again
                fence_regs<DT * 4>(&o[0][0][0]);
                fence_regs<BC / 4>(&pa[0][0]);
                if (lane == 0) mbar_arrive(empty_v(sp));
                if (!C::LZ || moved) rescale_o<DT>(o, alpha);
            }
            // IL without LATE_O: the uniform path packed P itself (with LATE_O the P V product in flight reads pa until
            // the wait above); the others pack here, after their loop
            if (LATE_O || !il_done) pack_p<T, BC>(pa, sacc);
        };
        tile(jb, std::true_type());
        for (int j = jb + 1; j < je; ++j) tile(j, std::false_type());
        {  // the last tile's P V (nkv >= 1: the launcher refuses N_k = 0), then its V buffer is free
            const int jl = jbase + (je - jb) - 1, sl = jl % STAGES;
            mbar_wait(full_v(sl), (jl / STAGES) & 1);
            fence_regs<DT * 4>(&o[0][0][0]);
            fence_regs<BC / 4>(&pa[0][0]);
            wgmma_fence();
            pv_product(o, pa, sv + sl * C::KV_BYTES);
            wgmma_commit();
            // TURN: the last consumer's last pass of an item had no taker in the tile loop (consumer 0 is done with this
            // item): with a next item consumer 0 takes it here and starts that item while this one's last P V product
            // and epilogue run. SPLIT: between whole items only (the tail's key-range units, which may be empty, keep
            // their first-turn arrival). Here, once the last product is issued, and not right after the tile loop:
            // there ptxas emitted half the split instances' exponentials twice and moved the others' loops
            if constexpr (C::TURN)
                if (c == C::NC - 1 && w + wstep < (SPLIT ? p.split_first : wend)) named_bar_arrive(BAR_TURN + 0, 256);
            wgmma_wait<0>();
            fence_regs<DT * 4>(&o[0][0][0]);
            fence_regs<BC / 4>(&pa[0][0]);
            if (PER && lane == 0) mbar_arrive(empty_v(sl));
        }

        // SPLIT: a key range of a tail item; only the warp that finishes its rows' last range writes them (the unit
        // decoded again here rather than held through the tile loop: values live across it move ptxas's schedule)
        bool emit = true;
        if constexpr (SPLIT) {
            int t, sjb, sje, part, np;
            split_unit(w, t, sjb, sje, part, np);
            if (t >= 0 && np > 1)
                emit = split_merge<DT>(p, t, part, np, tid - 128, c * 4 + warp, lane, o, m_run, l_run, t_run);
        }
        // Epilogue (as v4): normalize, lse / text_mass, stage O into this warp's own 16 rows of the
        // Q tile (every product that read them has completed), then 16-byte row stores.
        if (!SPLIT || emit) {
            const int64_t bh_row = ((int64_t)b * heads + h) * n;
            normalize_stage_o<T, DT, BR>(a, o, m_run, l_run, t_run, bh_row, q0, wrow0, lane, n, smem_q);
            __syncwarp();
            T *go = static_cast<T *>(a.out) + b * a.ob + h * a.oh;
            constexpr int CPR = DP / 8;
            for (int i2 = lane; i2 < 16 * CPR; i2 += 32) {
                const int r = i2 / CPR, cc = i2 % CPR;
                const int row = q0 + wrow0 + r;
                // (DP = 128 with D = 72..120, ws_head_dim_ok: the columns past D are not the output's)
                if (row < n && (DP == 64 || cc * 8 < a.d))
                    *reinterpret_cast<uint4 *>(go + (int64_t)row * a.on + cc * 8) =
                        *reinterpret_cast<const uint4 *>(smem_q + sw128_offset<BR>(wrow0 + r, cc));
            }
        }
        if (PER) {
            // Q buffer qb (its O staging read above) may be overwritten by the copy engine's next Q load:
            // order this thread's generic accesses before those async-proxy writes, then release it.
            __syncwarp();
            fence_proxy_async();
            mbar_arrive(empty_q(qb));
        }
    }  // items
#else
    (void)p;
#endif
}

/* The tail split's plan (SPLIT): items = query tiles x heads x batch on sms CTAs. The whole waves (items - items %
 * sms) run as before; the partial wave's tail items each as parts key ranges, the units spread over every CTA, the
 * ranges merged by the last one (split_merge). TACA_FWD_SPLIT:
 * - n forces n parts (at most the key tiles, 16);
 * - "auto" takes the count with the least estimated makespan of the tail, ceil(tail x P / sms) rounds of nkv / P + 6
 *   tiles (a range's fixed cost: its Q load, pipeline fill, state store and merge; 6 tiles puts the H100 runs on the
 *   right side: FLUX b2's tail split in 11 (-4%), b1's not split (5 parts in three rounds gained nothing),
 *   KERNEL_LOG twenty-fifth session), none when one part is best;
 * - "range": every CTA one contiguous range of the tail's tail x nkv key tiles (stream-K over the tail: one round of
 *   U / sms tiles, at most two units a CTA), when U >= sms;
 * - unset (and by_default): the range form where ceil(U / sms) + 10 < nkv (the default since the twenty-sixth
 *   session: FLUX 1024 b1's and b2's items 2-5% faster on an H100, KERNEL_LOG); "0": no split.
 * parts = 0: no split. Bytes: the tickets (tail x 8 ints, 256-aligned), then the states. */
struct SplitPlan {
    int first, tail, parts;  // parts: key ranges per tail item (range form: the most ranges any item has)
    size_t bytes, tickets_bytes;
    bool two;    // TACA_FWD_SPLIT_FORM=two: the whole items by the default kernel, then the ranges by a second launch
    bool range;  // TACA_FWD_SPLIT=range: one contiguous range of the tail's key tiles per CTA (split_unit)
};
template <int DP>
static inline SplitPlan fwd_split_plan(int64_t items, int sms, int nkv, bool by_default = true) {
    SplitPlan sp = {0, 0, 0, 0, 0, false, false};
    const char *env = getenv("TACA_FWD_SPLIT");
    const bool dflt = !env || !*env;  // unset: the range form where the model below expects a gain (by_default)
    if ((dflt && !by_default) || (!dflt && !strcmp(env, "0")) || sms <= 0 || items <= sms || items % sms == 0 || nkv < 2) return sp;
    const int tail = static_cast<int>(items % sms);
    int parts = 0;
    if (dflt || !strcmp(env, "range")) {
        // every CTA one range of U / sms tiles (U = tail x nkv >= sms: no empty range); the ranges covering item t are
        // CTAs c(t nkv) .. c(t nkv + nkv - 1), c(x) = ((x + 1) sms - 1) / U, as split_unit counts them
        const int64_t U = static_cast<int64_t>(tail) * nkv;
        if (U < sms) return sp;
        // the default only where the tail's round, ceil(U / sms) tiles plus 10 tiles' worth of fixed cost (the state
        // stores, the merge, the tickets' memset), is shorter than the nkv tiles of an unsplit item: 10 puts all 13
        // (N, H) points with a partial wave of an H100 sweep on their measured side (N 1536..8704, 24 / 48 heads; 6,
        // auto's value, had N 1536 at 24 and 48 heads and N 2560 at 24 split and 2-4% slower; KERNEL_LOG
        // twenty-sixth session)
        if (dflt && (U + sms - 1) / sms + 10 >= nkv) return sp;
        sp.range = true;
        for (int t = 0; t < tail; ++t) {
            const int64_t ib = static_cast<int64_t>(t) * nkv;
            const int np = static_cast<int>(((ib + nkv) * sms - 1) / U - ((ib + 1) * sms - 1) / U + 1);
            if (np > parts) parts = np;
        }
        if (parts < 2) parts = 2;  // (the slots; an item covered by one range merges nothing)
    } else if (!strcmp(env, "auto")) {
        double best = nkv;  // one part: the partial wave as it is
        for (int P = 2; P <= 16 && P <= nkv; ++P) {
            const double cost = static_cast<double>((static_cast<int64_t>(tail) * P + sms - 1) / sms) *
                                (static_cast<double>(nkv) / P + 6.0);
            if (cost < best) best = cost, parts = P;
        }
    } else {
        parts = atoi(env);
        if (parts > nkv) parts = nkv;
        if (parts > 16) parts = 16;
    }
    if (parts < 2) return sp;
    sp.first = static_cast<int>(items - tail);
    const char *form = getenv("TACA_FWD_SPLIT_FORM");
    sp.two = form && !strcmp(form, "two");
    sp.tail = tail;
    sp.parts = parts;
    sp.tickets_bytes = (static_cast<size_t>(tail) * 8 * sizeof(int) + 255) / 256 * 256;
    sp.bytes = sp.tickets_bytes + static_cast<size_t>(tail) * parts * (DP / 8 + 2) * 256 * 16;
    return sp;
}

/* The head dims a WS instance of padded dim DP runs: DP itself, and at DP = 128 aligned D = 72..120 too (Lumina 2's and
 * OmniGen's 96), zero-filled as the backward's v6 does: the tensor maps span D columns, so the copy engine fills the
 * columns past D of each 64-column box with zeros (S gains nothing from them, O's columns past D are zero), the
 * transaction bytes are still the whole box's, and the epilogue stores D columns. Before, these ran the cp.async
 * kernel (variant 13's tiling), 0.62-0.65x plain cuDNN at D = 96 (KERNEL_LOG, 2026-12-03); here 1.04x at D = 96 CFG
 * (0.668 against 1.247 ms on an H100, KERNEL_LOG forty-seventh session). TACA_FWD_PAD=0 sends them there again (a
 * timing switch). */
template <int DP>
static inline bool ws_head_dim_ok(int d) {
    if (d == DP) return true;
    if (DP == 256) return d >= 200 && d < 256 && d % 8 == 0;  // (the opt-in D = 256 instance, dispatch_d256)
    if (DP != 128 || d < 72 || d >= 128 || d % 8 != 0) return false;
    const char *e = getenv("TACA_FWD_PAD");
    return !(e && !strcmp(e, "0"));
}

/* TACA_ERR_UNSUPPORTED (nothing launched) when a map cannot be encoded. SPLIT: the tail split with plan sp in
 * workspace ws (sp.bytes; its tickets zeroed here, on the stream); sp.two: only the tail's ranges (the caller
 * launched the whole items). items_limit >= 0 (PERSIST): the first items_limit items only. */
template <typename T, typename C, bool FEAT = false, int MK = MK_NONE, bool KTA = false, bool SPLIT = false>
int launch_ws(const FwdArgs &a, int batch, int heads, cudaStream_t stream, const SplitPlan *sp = nullptr,
              void *ws = nullptr, int64_t items_limit = -1) {
    auto kernel = taca_fwd_sm90_ws_kernel<T, C, FEAT, MK, KTA, SPLIT>;
    cudaFuncAttributes attr;
    TACA_CUDA_TRY(cudaFuncGetAttributes(&attr, kernel), "taca_fwd_cuda (sm90 ws): cudaFuncGetAttributes");
    if (attr.binaryVersion != 90 || !ws_head_dim_ok<C::DP>(a.d)) return TACA_ERR_UNSUPPORTED;
    WsArgs p;
    memset(&p, 0, sizeof(p));
    p.a = a;
    if (!encode_map<T>(&p.tq, p.pos_q, a.q, a.qn, a.qh, a.qb, a.n, heads, batch, a.d, C::BR) ||
        !encode_map<T>(&p.tk, p.pos_k, a.k, a.kn, a.kh, a.kb, a.nk, heads / a.group, batch, a.d, C::BC) ||
        !encode_map<T>(&p.tv, p.pos_v, a.v, a.vn, a.vh, a.vb, a.nk, heads / a.group, batch, a.d, C::BC))
        return TACA_ERR_UNSUPPORTED;
    const size_t smem = C::SMEM + (MK == MK_KEY ? C::KT_BYTES : 0);
    TACA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                  "taca_fwd_cuda (sm90 ws): cudaFuncSetAttribute");
    const int64_t nqt = (a.n + C::BR - 1) / C::BR, all_items = nqt * heads * batch;
    int64_t items = items_limit >= 0 && items_limit < all_items ? items_limit : all_items;
    if (C::PERSIST) {
        if (items > INT32_MAX) return TACA_ERR_UNSUPPORTED;
        int sms = 0;
        const int st = device_sm_count(&sms, "taca_fwd_cuda (sm90 ws): SM count");
        if (st != TACA_OK) return st;  // nothing launched yet
        p.heads = heads;
        p.items = static_cast<int>(items);
        if constexpr (SPLIT) {
            if (!sp || !ws || sp->parts < 2 || sp->first + sp->tail != items) return TACA_ERR_UNSUPPORTED;
            p.split_tickets = static_cast<int *>(ws);
            p.split_ws = reinterpret_cast<float *>(static_cast<unsigned char *>(ws) + sp->tickets_bytes);
            p.split_first = sp->two ? 0 : sp->first;
            p.split_item0 = sp->first;
            p.split_tail = sp->tail;
            p.split_parts = sp->parts;
            p.split_range = sp->range;
            // the grid: the units, at most the SMs (range form: the SMs, whose count split_unit's ranges assume)
            if (sp->two) items = sp->range ? sms : static_cast<int64_t>(sp->tail) * sp->parts;
            TACA_CUDA_TRY(cudaMemsetAsync(ws, 0, sp->tickets_bytes, stream), "taca_fwd_cuda (sm90 ws): split tickets");
        }
        kernel<<<static_cast<unsigned>(items < sms ? items : sms), C::THREADS, smem, stream>>>(p);
    } else {
        dim3 grid(static_cast<unsigned>(nqt), heads, batch);
        kernel<<<grid, C::THREADS, smem, stream>>>(p);
    }
    return taca_cuda_check_launch("taca_fwd_cuda (sm90 ws): kernel launch");
}

}  // namespace taca_fwd90

#endif  /* TACA_FWD_SM90_WS_CUH_ */
