/*
 * taca_bwd.cu: CUDA backward of gamma-scaled joint attention (TACA), fp16 and bf16.
 *
 *   s_ij = scale * (q_i . k_j) * m_ij + mask_ij,  P_ij = exp(s_ij - lse_i)  (forward)
 *   delta_i = dO_i . O_i,  dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - delta_i)
 *   dQ_i = scale sum_j m_ij dS_ij k_j,  dK_j = scale sum_i m_ij dS_ij q_i,  dV_j = sum_i P_ij dO_i
 *   m_ij = gamma[b] (visual query, text key), gamma_reverse (text query, visual key), else 1,
 *   with the query text span [q_begin, q_end) for i and the key text span [k_begin, k_end) for
 *   j: the shared fields of taca.h or, per sample, the device (B, 4) array text_spans.
 *   mask_ij: 0 (none), -inf where a uint8 mask is 0, or a float32 additive mask, broadcast to
 *   (B, H, N_q, N_k) by element strides; it is a constant, so it enters through P only.
 *
 * Shapes: q, out, dout, dq are (B, N_q, H, D), k, v, dk, dv (B, N_k, H_kv, D), with element
 * strides per tensor and D contiguous; lse (B, H, N_q) float32 contiguous from the forward
 * (-inf: fully masked row); gamma (B,) float32 on the device. Query head h reads key/value head
 * h / (H / H_kv). Nothing of size N_q x N_k is stored.
 *
 * Algorithm (FlashAttention-2 backward, one pass over the key tiles):
 *   1. bwd_preprocess: delta_i and lse_i * log2(e) into the workspace (DP / 8 threads per row); lse2 =
 *      +inf for padding rows and fully masked rows (lse = -inf), so their P is exactly 0 (no NaN
 *      from -inf - -inf) and they contribute nothing (their dq is 0: out = 0 gives delta = 0).
 *   2. bwd_main, one CTA per (128 key rows, key/value head, batch): K_j, V_j stay in shared
 *      memory and dK_j, dV_j in registers; the CTA walks every query tile of every query head of
 *      its group (GQA: one flattened sequence, head-major; plain attention: group = 1), with a
 *      cp.async double buffer, recomputes P^T from lse, forms dS^T, accumulates dV and dK with
 *      mma.sync (fp32 accumulate), and computes the tile's dQ contribution dS K. So dK, dV of a
 *      key/value head are summed over its query heads in registers, exactly and in one fixed
 *      order (no reduce kernel, no expanded scratch); each query head keeps its own dQ chain.
 *      Keys past N_k are zero rows of K and V (and -inf in the masked path); queries past N_q
 *      zero rows with lse2 = +inf. Tiles whose m is uniform (all text or all visual keys and
 *      queries) take a fast path without per-element selects. With a mask, a key tile whose keys
 *      all attend takes the unmasked paths (keys_attend); the others add log2(e) mask_ij: a key
 *      mask's two terms per thread read once per query tile (BwdArgs::mask_keys, key_mask_terms;
 *      FLUX b2 / SD3.5-M with padded CFG text: v6 -8.8% / -13.0% against reading per element),
 *      other masks per element from global memory (mask_log2). The mask is a template flag
 *      (separate kernel instances), so the unmasked kernels carry no mask code. The spans of the
 *      CTA's sample go through shared memory (4 ints, read at every tile): held in registers
 *      across the loop, the per-sample loads cost spills.
 *   3. bwd_dq_convert (when there is more than one key tile): dq = scale * sum of the chains'
 *      float32 dQ buffers, summed in chain order, cast and stored with dq's strides.
 *   Determinism without floating-point atomics racing: the key tiles are split into nseg <= 4
 *   chains of consecutive tiles (about 8+ tiles each); each chain owns a float32 dQ buffer.
 *   Within a chain, the tiles add their dQ part of a query tile in the fixed order 0, 1, ...:
 *   the first stores, each next one waits on a per-(chain, b, chunk, h, query tile) counter
 *   until its predecessor released (thread 0 polls with ld.acquire, issued before the dQ
 *   matmul so its latency hides), then adds with fire-and-forget red.add.v2.f32, and releases
 *   at the top of its next query tile (thread 0: __threadfence + atomicExch, after a CTA
 *   barrier), so only warp 0 waits for the fence while the other warps start the next matmuls.
 *   Every float32 sum thus has one order on every run. Why this and not the alternatives:
 *   a separate dQ kernel would recompute S and dP (seven matmuls instead of five, 1.4x the
 *   work); one float32 buffer per key tile would be O(N^2 / 128) memory. Chains bound the
 *   start-up lag of the ordering (each link costs a fence and a poll) at the price of nseg
 *   dQ buffers. A CTA waits only on CTAs of the same chain with a smaller linear block index
 *   (blockIdx.x is the key tile; same blockIdx.y, z), which the hardware has already
 *   dispatched: no deadlock. With GQA every CTA of a key/value head walks the same flattened
 *   (query head, query tile) sequence, so the chains of all its query heads keep this order.
 *   params->deterministic = 0 uses red.add without order into one zeroed buffer
 *   (FlashAttention-2's atomics, non-deterministic). The environment variable TACA_BWD_MODE
 *   (atomic | atomicseg | racy | skipdq) overrides this for timing experiments only: racy and
 *   skipdq give a wrong dq on purpose (they bound the cost of the ordering and of the dQ matmul),
 *   atomicseg adds without order into the chains' nseg buffers (v6 in a TACA_BWD_TRACE build
 *   only: their footprint alone);
 *   TACA_BWD_NSEG=1..8 overrides the number of chains (timing too: 4 measured best on FLUX 1024
 *   before the skew, which takes the chains' lag away: v6 and mma.sync then run two at most, see layout_of).
 *   Measured history (H100, FLUX 1024 b1 bwd alone): v1 ordered with per-tile fence + load
 *   5.66 ms; v2 early poll + red + delayed release 3.62 ms; see KERNEL_LOG.md.
 *
 * Hopper: on an sm_90 device, in an sm_90a build, aligned D = 64 / 72..128 inputs take a wgmma
 * main kernel instead of bwd_main (same preprocess, workspace, chains and dq_convert): v6
 * (taca_bwd_sm90_v6.cu: producer warp, FA3's GEMM order, two writer warps; the dQ tile added by
 * 2-D TMA tensor reduce-adds at D = 64, by row bulk reduce-adds at D = 72..128), v5
 * (taca_bwd_sm90.cu) where v6 cannot encode its tensor maps; TACA_BWD_SM90_KERNEL=v5 / v6 forces
 * one, and TACA_BWD_SM90=0 in the environment forces bwd_main (tests, timing).
 * Configurations (taca_bwd_kernel.cuh, config_for): D <= 64 -> DP 64, query tile 128;
 * D <= 128 -> DP 128, query tile 64; D <= 256 -> DP 256 in two CTAs of 128 columns each
 * (each recomputes S and dP, owns half of dK, dV, dQ), query tile 32. Other D are zero-padded
 * to DP. Misaligned or odd-D inputs take a scalar load path.
 *
 * Workspace: lse2, delta (B*H*Np floats each), the order counters (nseg*B*nchunk*H*nq ints)
 * and the dQ buffers (nseg*B*H*Np*DP floats, only when there is more than one key tile); Np
 * is N_q rounded up to the query tile, the number of key tiles (and chains) follows N_k.
 * O(N) memory; the layouts put a group's query heads next to each other, so the flattened
 * (head, tile) index addresses lse2, delta, counters and buffers from the group's first head.
 * Not run here (TACA_ERR_UNSUPPORTED): N_q = 0 (or H = 0) with a non-empty dk / dv (they
 * would need zeroing); sizes beyond 2^30 and grids beyond 65535 (H_kv * nchunk, B).
 * N_k = 0 (every row fully masked): dq = 0 is written by bwd_dq_convert over zero chains.
 * Build check:
 *   nvcc -std=c++17 -O3 -Icsrc -Icsrc/cuda -gencode=arch=compute_90a,code=sm_90a \
 *     -c csrc/cuda/taca_bwd.cu -o /tmp/x.o -Xptxas -v
 * Version log and timings: benchmarks/results/KERNEL_LOG.md (backward section).
 */
#include <stdlib.h>
#include <string.h>

#include "taca_bwd_kernel.cuh"

/* taca_bwd_sm90.cu (v5) and taca_bwd_sm90_v6.cu (v6): the wgmma main kernels, same workspace
 * layout; TACA_ERR_UNSUPPORTED where they do not apply. */
int taca_bwd_sm90(const taca_bwd::BwdArgs &a, cudaStream_t stream, bool bf16);
int taca_bwd_sm90_v6(const taca_bwd::BwdArgs &a, cudaStream_t stream, bool bf16);
/* taca_bwd_sm90_d256.cu: the wgmma main kernel at D = 136..256 (TACA_ERR_UNSUPPORTED where it does not apply). */
int taca_bwd_sm90_d256(const taca_bwd::BwdArgs &a, cudaStream_t stream, bool bf16);
bool taca_bwd_sm90_d256_enabled();

namespace {

struct Layout {
    int dp, dc, bm, np, nq, nk, nseg, seg_size, skew_len;
    size_t off_lse2, off_delta, off_sem, off_work, off_acc, total;
};

size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

bool layout_of(const taca_bwd_params *p, Layout *L) {
    const taca_bwd::Config c = taca_bwd::config_for(p->head_dim);
    if (p->seqlen > (1 << 30) || p->seqlen_k > (1 << 30)) return false;
    const int64_t N = p->seqlen;  // query rows: tiles, lse2, delta, counters, dQ buffers
    L->dp = c.dp;
    L->dc = c.dc;
    L->bm = c.bm;
    // rows: a multiple of the query tile; at D = 256 of 64 where the Hopper kernel may run (taca_bwd_sm90_d256.cu's
    // 64-row tiles; a fallback to the mma.sync kernel then walks an even number of its 32-row tiles, the last
    // possibly all padding: P = 0 there)
    const int64_t row_unit = c.dp == 256 && taca_bwd_sm90_d256_enabled() ? 64 : c.bm;
    L->np = static_cast<int>((N + row_unit - 1) / row_unit * row_unit);
    L->nq = L->np / c.bm;
    L->nk = static_cast<int>((p->seqlen_k + taca_bwd::kBlockN - 1) / taca_bwd::kBlockN);
    // The kernels index a group's query rows as int (flattened tile * BM): group * Np < 2^31.
    if (static_cast<int64_t>(L->np) * (p->heads / p->heads_kv) > (int64_t{1} << 30)) return false;
    // Chains of about 8+ key tiles: a chain's start-up lag grows with its length, and each
    // chain costs one float32 dQ buffer (two at most beyond 8192 tokens, to bound memory).
    int nseg = L->nk / 8;
    nseg = nseg < 1 ? 1 : (nseg > 4 ? 4 : nseg);
    if (N > 8192 && nseg > 2) nseg = 2;
    // Three chains at most from 48 (batch, head) pairs: with twice FLUX 1024's CTAs the chains' start-up lag is
    // amortized and one dQ buffer less to sum pays (H100 v6, backward alone, KERNEL_LOG thirty-first and -second
    // sessions: FLUX 1024 b2 -1.1% / -2.3% / -2.0% / -2.0% in four calls, fwd+bwd sustained -1.5%; SD3.5-M / -L CFG
    // within 1%; at b1, 24 pairs, it cost +0.4%).
    if (static_cast<int64_t>(p->batch) * p->heads >= 48 && nseg > 3) nseg = 3;
    // The skew (taca_bwd_sm90_v6.cu, item 10; bwd_main too) takes the chains' lag away: where it applies the
    // kernels run two chains at most (one fp32 dQ buffer fewer to sum than three, two fewer than four; H100, v6
    // backward alone, one mode per process, KERNEL_LOG thirty-third session: FLUX 1024 b1 1.350 against 1.356 ms
    // with four, b2 2.698 against 2.731 with three, SD3.5-M CFG 1.450 against 1.461 with three; one chain lost 12%
    // there).
    int skew_nseg = nseg > 2 ? 2 : nseg;
    if (const char *e = getenv("TACA_BWD_NSEG")) {  // timing experiments only (1..8 chains, with the skew too)
        const int n = atoi(e);
        if (n >= 1 && n <= 8) nseg = skew_nseg = n;
    }
    const int nk1 = L->nk < 1 ? 1 : L->nk;  // N_k = 0 (no key tile): one empty chain
    L->seg_size = (nk1 + nseg - 1) / nseg;
    L->nseg = (nk1 + L->seg_size - 1) / L->seg_size;
    L->skew_len = (nk1 + skew_nseg - 1) / skew_nseg;  // >= seg_size: its chains fit the workspace's
    const size_t bh = static_cast<size_t>(p->batch) * static_cast<size_t>(p->heads);
    const size_t rows = bh * static_cast<size_t>(L->np);
    const size_t nch = static_cast<size_t>(c.dp / c.dc);
    L->off_lse2 = 0;
    L->off_delta = align256(rows * sizeof(float));
    L->off_sem = L->off_delta + align256(rows * sizeof(float));
    const size_t nseg_z = static_cast<size_t>(L->nseg);
    // the sem counters, then bwd_dq_convert_tiles' item counter (8-byte aligned), zeroed together
    L->off_work = L->off_sem + ((nseg_z * bh * nch * static_cast<size_t>(L->nq) * sizeof(int) + 7) & ~size_t{7});
    L->off_acc = align256(L->off_work + sizeof(unsigned long long));
    // dQ buffer rows of DP + kAccPad floats (see kAccPad)
    L->total = L->off_acc +
               (L->nk > 1 ? nseg_z * rows * static_cast<size_t>(c.dp + taca_bwd::kAccPad) * sizeof(float) : 0);
    return true;
}

}  // namespace

extern "C" size_t taca_bwd_workspace_size(const taca_bwd_params *p) {
    if (taca_check_bwd(p) != TACA_OK) return 0;
    if (p->batch * p->seqlen * p->heads == 0) return 0;
    Layout L;
    if (!layout_of(p, &L)) return 0;
    return L.total;
}

extern "C" int taca_bwd_cuda(const taca_bwd_params *p, void *stream_ptr) {
    int st = taca_check_bwd(p);
    if (st != TACA_OK) return st;
    if (p->dtype != TACA_F16 && p->dtype != TACA_BF16) return TACA_ERR_DTYPE;
    if (p->batch * p->seqlen * p->heads == 0) {
        /* no query rows: dk, dv would have to be zeroed (not done here) when they are not empty */
        if (p->batch * p->seqlen_k * p->heads_kv != 0) return TACA_ERR_UNSUPPORTED;
        return TACA_OK;
    }
    /* N_q != N_k, grouped KV heads, query / key spans, per-sample spans and masks are all
     * handled in-kernel. The additive mask is float32 here (the accumulation type). */
    if (p->heads > (1 << 30)) return TACA_ERR_UNSUPPORTED;
    Layout L;
    if (!layout_of(p, &L)) return TACA_ERR_UNSUPPORTED;
    if (p->heads_kv * (L.dp / L.dc) > 65535 || p->batch > 65535) return TACA_ERR_UNSUPPORTED;
    if (!p->workspace || p->workspace_bytes < L.total) return TACA_ERR_WORKSPACE;
    if ((reinterpret_cast<uintptr_t>(p->workspace) & 15) != 0) return TACA_ERR_WORKSPACE;
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);

    taca_bwd::BwdArgs a;
    a.q = p->q;
    a.k = p->k;
    a.v = p->v;
    a.out = p->out;
    a.dout = p->dout;
    a.dq = p->dq;
    a.dk = p->dk;
    a.dv = p->dv;
    a.lse = static_cast<const float *>(p->lse);
    a.gamma = static_cast<const float *>(p->gamma);  /* float: the accumulation type */
    unsigned char *ws = static_cast<unsigned char *>(p->workspace);
    a.lse2 = reinterpret_cast<float *>(ws + L.off_lse2);
    a.delta = reinterpret_cast<float *>(ws + L.off_delta);
    a.sem = reinterpret_cast<int *>(ws + L.off_sem);
    a.work = reinterpret_cast<unsigned long long *>(ws + L.off_work);
    a.dq_acc = reinterpret_cast<float *>(ws + L.off_acc);
    a.acc_ld = L.dp;  // (v6's row writer: DP + kAccPad)
    a.qs_b = p->q_stride.b, a.qs_n = p->q_stride.n, a.qs_h = p->q_stride.h;
    a.ks_b = p->k_stride.b, a.ks_n = p->k_stride.n, a.ks_h = p->k_stride.h;
    a.vs_b = p->v_stride.b, a.vs_n = p->v_stride.n, a.vs_h = p->v_stride.h;
    a.os_b = p->out_stride.b, a.os_n = p->out_stride.n, a.os_h = p->out_stride.h;
    a.dos_b = p->dout_stride.b, a.dos_n = p->dout_stride.n, a.dos_h = p->dout_stride.h;
    a.dqs_b = p->dq_stride.b, a.dqs_n = p->dq_stride.n, a.dqs_h = p->dq_stride.h;
    a.dks_b = p->dk_stride.b, a.dks_n = p->dk_stride.n, a.dks_h = p->dk_stride.h;
    a.dvs_b = p->dv_stride.b, a.dvs_n = p->dv_stride.n, a.dvs_h = p->dv_stride.h;
    a.B = static_cast<int>(p->batch);
    a.N = static_cast<int>(p->seqlen);
    a.H = static_cast<int>(p->heads);
    a.D = static_cast<int>(p->head_dim);
    a.Np = L.np;
    a.nq = L.nq;
    a.Nk = static_cast<int>(p->seqlen_k);
    a.Hkv = static_cast<int>(p->heads_kv);
    a.group = static_cast<int>(p->heads / p->heads_kv);
    a.nk = L.nk;
    a.text_begin = static_cast<int>(p->text_begin);
    a.text_end = static_cast<int>(p->text_end);
    a.q_text_begin = static_cast<int>(p->q_text_begin);
    a.q_text_end = static_cast<int>(p->q_text_end);
    a.spans = p->text_spans;
    a.mask = taca_cuda::mask_args(p->mask);
    {
        // a key mask: its terms per query tile (BwdArgs::mask_keys); TACA_BWD_MASK=elem forces the
        // per-element path of general masks (a timing switch: the same gradients bitwise)
        const char *mk = getenv("TACA_BWD_MASK");
        a.mask_keys = a.mask.data && a.mask.q == 0 && !(mk && !strcmp(mk, "elem"));
    }
    a.gamma_reverse = static_cast<float>(p->gamma_reverse);
    a.scale = static_cast<float>(p->scale);

    auto al16 = [](const void *ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
    auto st8 = [](const taca_strides &s) { return s.b % 8 == 0 && s.n % 8 == 0 && s.h % 8 == 0; };
    a.vec_load = p->head_dim % 8 == 0 && al16(p->q) && al16(p->k) && al16(p->v) &&
                 al16(p->dout) && st8(p->q_stride) && st8(p->k_stride) && st8(p->v_stride) &&
                 st8(p->dout_stride);
    auto al4 = [](const void *ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 3) == 0; };
    auto st2 = [](const taca_strides &s) { return s.b % 2 == 0 && s.n % 2 == 0 && s.h % 2 == 0; };
    a.pair_store = p->head_dim % 2 == 0 && al4(p->dq) && al4(p->dk) && al4(p->dv) &&
                   st2(p->dq_stride) && st2(p->dk_stride) && st2(p->dv_stride);

    a.mode = p->deterministic ? taca_bwd::kOrdered : taca_bwd::kAtomic;
    bool keep_chains = false;
    if (const char *m = getenv("TACA_BWD_MODE")) {  // timing experiments only
        if (!strcmp(m, "atomic")) a.mode = taca_bwd::kAtomic;
#if defined(TACA_BWD_TRACE)
        // unordered adds into the deterministic chains' buffers (v6, trace builds only): the
        // chains' memory footprint without their order, to tell the two costs apart
        else if (!strcmp(m, "atomicseg")) a.mode = taca_bwd::kAtomic, keep_chains = true;
#endif
        else if (!strcmp(m, "racy")) a.mode = taca_bwd::kRacy;
        else if (!strcmp(m, "skipdq")) a.mode = taca_bwd::kSkip;
    }
    // v6 converts dQ tiles beside its main kernel's last wave (bwd_dq_convert_tiles);
    // TACA_BWD_DQ_OVERLAP=0 converts after it, =2 too but with the main kernel's per-tile
    // releases kept (timing switches, read per call)
    const char *ov = getenv("TACA_BWD_DQ_OVERLAP");
    a.dq_overlap = !(a.mode == taca_bwd::kOrdered || a.mode == taca_bwd::kAtomic) ? 0
                   : !ov ? 1 : !strcmp(ov, "0") ? 0 : !strcmp(ov, "2") ? 2 : 1;
    a.nseg = L.nseg;
    a.seg_size = L.seg_size;
    a.chain_len = L.skew_len;  // the chains with the skew (decided on this in every mode: dK / dV sum alike)
    a.skew = 0;                // each kernel's launch decides (apply_skew_rule)
    if (a.mode != taca_bwd::kOrdered && !keep_chains) {  // one buffer, no chains
        a.nseg = 1;
        a.seg_size = L.nk;
    }
    const bool bf16 = p->dtype == TACA_BF16;
    if (a.Nk == 0) {
        // No keys: every row is fully masked (out = 0, lse = -inf), so dq = 0 (dk, dv are
        // empty). bwd_dq_convert over zero chains writes exactly that.
        // (DP = 64 here: its column loop covers any D, and no workspace row is read.)
        a.nseg = 0;
        return bf16 ? taca_bwd::launch_dq_convert<__nv_bfloat16, 64>(a, stream, "taca_bwd_cuda dq zero")
                    : taca_bwd::launch_dq_convert<__half, 64>(a, stream, "taca_bwd_cuda dq zero");
    }
    const size_t sem_bytes = L.off_acc - L.off_sem;
    TACA_CUDA_TRY(cudaMemsetAsync(a.sem, 0, sem_bytes, stream), "taca_bwd_cuda memset");
    // Hopper path (taca_bwd_sm90*.cu) for aligned D = 64 / 72..128 on sm_90 when built for
    // sm_90a (see the header above). TACA_BWD_SM90=0 forces the mma.sync kernel. Both are test /
    // timing switches, read at every call.
    if (keep_chains)  // atomicseg: v6's diagnostic only (the other kernels add into one buffer)
        return taca_bwd_sm90_v6(a, stream, bf16);
    const char *sm90_env = getenv("TACA_BWD_SM90");
    if (!(sm90_env && !strcmp(sm90_env, "0"))) {
        // v6 (faster at every D it takes: KERNEL_LOG "Backward v6" and after), v5 where v6 does not
        // apply; TACA_BWD_SM90_KERNEL=v5 / v6 forces one kernel
        const char *kern = getenv("TACA_BWD_SM90_KERNEL");
        const bool v6 = kern ? !strcmp(kern, "v6") : true;
        if (v6) {
            const int st6 = taca_bwd_sm90_v6(a, stream, bf16);
            if (st6 != TACA_ERR_UNSUPPORTED) return st6;
        }
        const int st90 = taca_bwd_sm90(a, stream, bf16);
        if (st90 != TACA_ERR_UNSUPPORTED) return st90;
        if (L.dp == 256) {  // D = 136..256: the wgmma kernel where it applies (TACA_BWD_D256=wgmma / mma)
            const int st256 = taca_bwd_sm90_d256(a, stream, bf16);
            if (st256 != TACA_ERR_UNSUPPORTED) return st256;
        }
    }
    switch (L.dp) {
    case 64: return taca_bwd::launch_d64(a, stream, bf16);
    case 128: return taca_bwd::launch_d128(a, stream, bf16);
    default: return taca_bwd::launch_d256(a, stream, bf16);
    }
}
