/*
 * taca_sm90.cuh: shared-memory layout helpers for the Hopper (sm_90a, wgmma) kernels.
 *
 * Every wgmma operand tile here uses the 128-byte-swizzled layout: a tile of ROWS rows and
 * DP (a multiple of 64) 16-bit columns is stored as DP/64 column blocks, each ROWS x 128 bytes;
 * row r of a block starts at r * 128, and its 16-byte chunk c (columns 8c .. 8c+7 of the block)
 * sits at chunk position c ^ (r % 8). Blocks start 1024-byte aligned, so this is exactly the
 * hardware's 128B swizzle (address bits [4:6] ^= bits [7:9]) and wgmma reads it through a
 * descriptor:
 *   - K-major operand (rows = M or N, columns = the reduction dim K): 8-row groups 1024 B apart
 *     (stride byte offset), K steps of 16 columns = +32 B on the start address inside a block;
 *   - MN-major operand (rows = the reduction dim K, columns = N), e.g. V in O += P V: 8-row
 *     groups of K 1024 B apart; N = 64 columns per wgmma, so one column block per instruction.
 * Both byte offsets of every descriptor are set to 1024: for the operand shapes used here only
 * one of them is ever consulted, so the descriptor does not depend on which field the hardware
 * reads for which layout.
 */
#ifndef TACA_SM90_CUH_
#define TACA_SM90_CUH_

#include <stdint.h>

#include <type_traits>

#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes from the runtime)

#include "taca_cuda_common.cuh"
#include "taca_wgmma.cuh"

namespace taca_sm90 {

using namespace taca_cuda;

/* wgmma shared-memory matrix descriptor, 128-byte swizzle, both byte offsets 1024. */
__device__ __forceinline__ uint64_t desc_sw128(uint32_t smem_addr) {
    return (uint64_t)((smem_addr & 0x3FFFFu) >> 4) | ((uint64_t)(1024 >> 4) << 16) |
           ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

/* The same for an N-major (transposed) operand wider than one swizzle atom: a tile stored as
 * 64-column blocks of 128-byte rows (sw128_offset's layout), the blocks lbo bytes apart. For an
 * N-major layout the leading byte offset is the stride between 64-element blocks along N (unused
 * when N <= 64), the stride byte offset the one between groups of 8 rows along K (1024). */
__device__ __forceinline__ uint64_t desc_sw128_mn(uint32_t smem_addr, uint32_t lbo) {
    return (uint64_t)((smem_addr & 0x3FFFFu) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFFu) << 16) |
           ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

/* The descriptor of the address off bytes past desc's (off a multiple of 16). The start address
 * is the low 14 bits (addr >> 4) and shared-memory addresses stay below 2^18, so the sum never
 * carries into the byte-offset fields: one 32-bit add per wgmma instead of desc_sw128's mask,
 * shift and or (ptxas cannot drop the mask of addr + off itself). */
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t off) {
    return (desc & 0xFFFFFFFF00000000ull) | (static_cast<uint32_t>(desc) + (off >> 4));
}

/* Order this thread's earlier shared-memory writes (ordinary or cp.async) before later reads by
 * the async proxy (wgmma); put it before the barrier that publishes the data. */
__device__ __forceinline__ void fence_proxy_async() {
#if TACA_SM90A
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/* Byte offset of (row r, 16-byte chunk c of the full row) in a swizzled tile of ROWS rows. */
template <int ROWS>
__device__ __forceinline__ uint32_t sw128_offset(int r, int c) {
    return (uint32_t)((c >> 3) * ROWS * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

/* Rows [row0, row0 + ROWS) of a (N, D) slice with row stride stride_n (16-byte aligned rows,
 * D % 8 == 0) into a swizzled tile at smem address s; rows >= n and columns >= d are zero. */
template <typename T, int ROWS, int DP, int THREADS>
__device__ __forceinline__ void load_tile_sw128(uint32_t s, const T *g, int64_t stride_n, int row0,
                                                int n, int d, int tid) {
    constexpr int CPR = DP / 8;
    static_assert(THREADS % CPR == 0, "threads must cover whole rows");
    constexpr int RSTEP = THREADS / CPR;
    static_assert(RSTEP % 8 == 0 && ROWS % RSTEP == 0, "row step must keep the swizzle phase");
    const int c = tid % CPR, r0 = tid / CPR;
    const bool cok = c * 8 < d;
    const T *src = g + (int64_t)(row0 + r0) * stride_n + c * 8;
    const int64_t step = (int64_t)RSTEP * stride_n;
    const uint32_t dst = s + sw128_offset<ROWS>(r0, c);
#pragma unroll
    for (int it = 0; it < ROWS / RSTEP; ++it) {
        const bool ok = cok && row0 + r0 + it * RSTEP < n;
        cp_async_16(dst + it * RSTEP * 128, ok ? (const void *)src : (const void *)g, ok ? 16 : 0);
        src += step;
    }
}

/* ---- Warp-specialized pipeline pieces (taca_fwd_sm90_ws.cuh): mbarriers, TMA, named barriers,
 * register reallocation. All sm_90a-only; elsewhere they compile to nothing. ---- */

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if TACA_SM90A
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
/* Make mbarrier inits visible to the other threads and to the async proxy (TMA). */
__device__ __forceinline__ void mbar_init_fence() {
#if TACA_SM90A
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/* One arrival that also announces `bytes` of TMA transactions for the current phase. */
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if TACA_SM90A
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if TACA_SM90A
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
/* Wait until the phase of parity `parity` of the barrier has completed. */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if TACA_SM90A
    asm volatile(
        "{\n.reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
#endif
}
/* 4-d TMA tile load (coordinates innermost first) into shared memory, completing on `bar`. */
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void *tmap, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
#if TACA_SM90A
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst), "l"(tmap), "r"(bar), "r"(c0), "r"(c1),
        "r"(c2), "r"(c3) : "memory");
#endif
}
/* Non-tensor bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from global
 * to shared memory, completing on `bar` (count the bytes with mbar_arrive_expect_tx). */
__device__ __forceinline__ void bulk_load(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar) {
#if TACA_SM90A
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
#endif
}
__device__ __forceinline__ void tma_prefetch_desc(const void *tmap) {
#if TACA_SM90A
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(tmap) : "memory");
#endif
}
/* Named barriers (ids 1..15; 0 is __syncthreads): sync waits, arrive only signals. */
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
/* Per-warpgroup register budget (all 128 threads of the warpgroup must execute it). */
template <int R> __device__ __forceinline__ void setmaxnreg_inc() {
#if TACA_SM90A
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}
template <int R> __device__ __forceinline__ void setmaxnreg_dec() {
#if TACA_SM90A
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}

/* Coordinate of map dimension dim (1..3) for (row, head, batch), by the map's pos (encode_map). */
__device__ __forceinline__ int ws_coord(const int (&pos)[3], int dim, int row, int h, int b) {
    return pos[0] == dim ? row : (pos[1] == dim ? h : b);
}

/* One tile of ROWS rows x DP columns by TMA into dst, as DP / 64 boxes of 64 columns (128 bytes, the 128B
 * swizzle's width) ROWS * 128 bytes apart, completing on mbarrier bar: (row, head, batch) placed by pos. */
template <int DP, int ROWS>
__device__ __forceinline__ void tma_load_tile(uint32_t dst, const void *tmap, const int (&pos)[3], uint32_t bar, int row,
                                              int h, int b) {
#pragma unroll
    for (int cb = 0; cb < DP / 64; ++cb)
        tma_load_4d(dst + cb * ROWS * 128, tmap, bar, cb * 64, ws_coord(pos, 1, row, h, b), ws_coord(pos, 2, row, h, b),
                    ws_coord(pos, 3, row, h, b));
}

/* Host: the driver's tensor-map encoder, fetched once through the runtime (no -lcuda). */
typedef CUresult (*EncodeTiledFn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                  const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                                  CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

static inline EncodeTiledFn encode_tiled_fn() {
    static EncodeTiledFn fn = [] {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess)
            f = nullptr;
#else
        if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q) != cudaSuccess) f = nullptr;
#endif
        if (q != cudaDriverEntryPointSuccess) f = nullptr;
        cudaGetLastError();  // a failed lookup must not leak into the launch check
        return reinterpret_cast<EncodeTiledFn>(f);
    }();
    return fn;
}

/* A 4-d map of one (B, N, H, D)-strided tensor: dimension 0 = the D columns (64-column boxes,
 * 128B swizzle), dimensions 1..3 = rows, heads, batch ordered by increasing stride; box_rows
 * rows per box. false when the driver rejects it (the caller then takes the cp.async kernel). */
template <typename T>
bool encode_map(CUtensorMap *m, int (&pos)[3], const void *base, int64_t sn, int64_t sh, int64_t sb, int n,
                int heads, int batch, int d, int box_rows) {
    EncodeTiledFn fn = encode_tiled_fn();
    if (!fn) return false;
    int64_t stride[3] = {sn, sh, sb};
    const int64_t size[3] = {n, heads, batch};
    // size-1 dimensions may carry any stride (even 0): give them a harmless one
    int64_t big = 0;
    for (int i = 0; i < 3; ++i)
        if (size[i] > 1 && stride[i] > big) big = stride[i];
    for (int i = 0; i < 3; ++i)
        if (size[i] == 1) stride[i] = big > 0 ? big : d;
    int order[3] = {0, 1, 2};
    for (int i = 1; i < 3; ++i)  // stable insertion sort by stride
        for (int k = i; k > 0 && stride[order[k]] < stride[order[k - 1]]; --k) {
            const int t = order[k];
            order[k] = order[k - 1];
            order[k - 1] = t;
        }
    cuuint64_t dims[4] = {(cuuint64_t)d, 0, 0, 0}, strides[3];
    cuuint32_t box[4] = {64, 1, 1, 1}, estr[4] = {1, 1, 1, 1};
    for (int k = 0; k < 3; ++k) {
        const int i = order[k];
        dims[k + 1] = (cuuint64_t)size[i];
        strides[k] = (cuuint64_t)stride[i] * sizeof(T);
        if (i == 0) box[k + 1] = (cuuint32_t)box_rows;
        pos[i] = k + 1;
    }
    const CUtensorMapDataType dt =
        std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    return fn(m, dt, 4, const_cast<void *>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* Host side: TACA_OK when the current device is compute capability 9.0 (cached per device),
 * TACA_ERR_UNSUPPORTED otherwise, TACA_ERR_CUDA when the query fails. The caller still checks
 * that the kernel it launches was built for sm_90a (cudaFuncAttributes::binaryVersion). */
static inline int device_is_sm90(const char *where) {
    static int cc[64];  // per device: 0 unknown, 1 sm_90, 2 other
    int dev = 0;
    TACA_CUDA_TRY(cudaGetDevice(&dev), where);
    if (dev < 0 || dev >= 64) return TACA_ERR_UNSUPPORTED;
    if (cc[dev] == 0) {
        int major = 0, minor = 0;
        TACA_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), where);
        TACA_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), where);
        cc[dev] = (major == 9 && minor == 0) ? 1 : 2;
    }
    return cc[dev] == 1 ? TACA_OK : TACA_ERR_UNSUPPORTED;
}

}  // namespace taca_sm90

#endif  /* TACA_SM90_CUH_ */
