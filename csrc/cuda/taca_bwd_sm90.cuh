/*
 * taca_bwd_sm90.cuh: helpers of the Hopper (sm_90a) backward kernel (taca_bwd_sm90.cu), kept
 * apart so tests/cuda_harness/wgmma_check.cu checks exactly the code the kernel uses.
 *
 * stmatrix_x4_trans: four 8x8 16-bit matrices from a warp's mma/wgmma fragments (thread lane
 * holds row lane/4, columns 2*(lane%4), +1 of each, packed) stored TRANSPOSED: lanes 8i..8i+7
 * give the 16-byte row addresses of matrix i; memory row r of matrix i receives column r of the
 * fragment matrix. With the RS A-fragment packing of a 16 x 16 block (a[0]: rows 0-7 / cols
 * 0-7, a[1]: rows 8-15 / cols 0-7, a[2]: rows 0-7 / cols 8-15, a[3]: rows 8-15 / cols 8-15),
 * lane L addresses memory row (L >> 4) * 8 + (L & 7) (a fragment column) and the 8-element
 * chunk ((L >> 3) & 1) (fragment rows 0-7 or 8-15): see store_block_trans.
 */
#ifndef TACA_BWD_SM90_CUH_
#define TACA_BWD_SM90_CUH_

#include "taca_sm90.cuh"

namespace taca_bwd90 {

__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, const uint32_t *r) {
#if TACA_SM90A
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                 "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
#else
    (void)addr; (void)r;
#endif
}

/* stmatrix_x4 without .trans: four 8x8 16-bit matrices stored as they are held (memory row r of
 * matrix i = fragment row r): lanes 8i..8i+7 give the 16-byte row addresses of matrix i. With an
 * m64nN wgmma accumulator packed per 8-column block nb (r[0]: rows g of block nb, r[1]: rows g + 8,
 * r[2], r[3]: the same of block nb + 1), lane L addresses fragment row ((L >> 3) & 1) * 8 + (L & 7)
 * of the warp's 16 and 16-byte chunk nb + (L >> 4): see store_acc_rows. */
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t *r) {
#if TACA_SM90A
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
                 "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
#else
    (void)addr; (void)r;
#endif
}

/* TMA bulk operations of the dQ writer (the "bulk" hand-off of v5, v6) (bytes a multiple of 16, both addresses 16-byte
 * aligned): g[0..bytes) += s[..] (f32) or g = s, in this thread's bulk async-group; commit, wait
 * until the sources were read (the shared memory may be reused) / until the writes completed. */
__device__ __forceinline__ void bulk_add_f32(float *g, uint32_t s, uint32_t bytes) {
#if TACA_SM90A
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(g), "r"(s),
                 "r"(bytes)
                 : "memory");
#else
    (void)g; (void)s; (void)bytes;
#endif
}
__device__ __forceinline__ void bulk_store(float *g, uint32_t s, uint32_t bytes) {
#if TACA_SM90A
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(g), "r"(s), "r"(bytes) : "memory");
#else
    (void)g; (void)s; (void)bytes;
#endif
}
/* 2-D TMA tensor operations of v6's tensor writer: the box at (column c0, row c1) of map tmap
 * += (f32) or = the box staged at shared address s (the map's layout and swizzle), in this thread's
 * bulk async-group. */
__device__ __forceinline__ void tma_add_2d(const void *tmap, uint32_t s, int c0, int c1) {
#if TACA_SM90A
    asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(tmap),
                 "r"(s), "r"(c0), "r"(c1)
                 : "memory");
#else
    (void)tmap; (void)s; (void)c0; (void)c1;
#endif
}
__device__ __forceinline__ void tma_store_2d(const void *tmap, uint32_t s, int c0, int c1) {
#if TACA_SM90A
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(tmap), "r"(s),
                 "r"(c0), "r"(c1)
                 : "memory");
#else
    (void)tmap; (void)s; (void)c0; (void)c1;
#endif
}
/* 4-D TMA tensor store (coordinates innermost first) of the box staged at shared address s (the map's
 * layout and swizzle), in this thread's bulk async-group; out-of-bounds parts of the box are not written. */
__device__ __forceinline__ void tma_store_4d(const void *tmap, uint32_t s, int c0, int c1, int c2, int c3) {
#if TACA_SM90A
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(tmap),
                 "r"(s), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
                 : "memory");
#else
    (void)tmap; (void)s; (void)c0; (void)c1; (void)c2; (void)c3;
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if TACA_SM90A
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_read() {
#if TACA_SM90A
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_write() {
#if TACA_SM90A
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    asm volatile("fence.proxy.async.global;\n" ::: "memory");  // async-proxy writes before the release
#endif
}
/* Store the transpose of a warp's 16 x 16 block (RS A-fragment packing, fragment rows
 * row0 .. row0+15 (a multiple of 8), fragment columns col0 .. col0+15) into a 128B-swizzled
 * K-major tile of ROWS rows at smem address s: tile row = fragment column, tile column =
 * fragment row. */
template <int ROWS>
__device__ __forceinline__ void store_block_trans(uint32_t s, const uint32_t *a, int row0, int col0,
                                                  int lane) {
    const int r = col0 + ((lane >> 4) << 3) + (lane & 7);
    const int c = (row0 >> 3) + ((lane >> 3) & 1);
    stmatrix_x4_trans(s + taca_sm90::sw128_offset<ROWS>(r, c), a);
}

/* store_block_trans's untransposed twin (the D = 256 backward's P^T and dS'^T): a warp's 16 x 16 block in the RS
 * A-fragment packing (a[0]: rows 0-7 / cols 0-7, a[1]: rows 8-15 / cols 0-7, a[2], a[3]: cols 8-15) stored as it is
 * into a 128B-swizzled K-major tile of ROWS rows: rows row0.., columns col0.. (col0 a multiple of 8): lane L addresses
 * row row0 + ((L >> 3) & 1) * 8 + (L & 7), 16-byte chunk col0 / 8 + (L >> 4). */
template <int ROWS>
__device__ __forceinline__ void store_block(uint32_t s, const uint32_t *a, int row0, int col0, int lane) {
    const int r = row0 + ((lane >> 3) & 1) * 8 + (lane & 7);
    stmatrix_x4(s + taca_sm90::sw128_offset<ROWS>(r, (col0 >> 3) + (lane >> 4)), a);
}

/* A warp's rows of an m64nN fp32 wgmma accumulator (16 rows: row0 = 16 * warp of the warpgroup's 64,
 * + the warpgroup's first tile row; N / 8 blocks of acc[nb * 4 .. + 3]), times `mul`, converted to T and
 * stored into a 128B-swizzled tile of ROWS rows (N / 64 blocks of 64 columns, ROWS * 128 bytes apart: the
 * layout TMA loads and stores with a 128B-swizzled box of 64 columns): one stmatrix_x4 per 16 columns. */
template <typename T, int ROWS, int N>
__device__ __forceinline__ void store_acc_rows(uint32_t s, const float *acc, float mul, int row0, int lane) {
    const int r = row0 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
    for (int nb = 0; nb < N / 8; nb += 2) {
        uint32_t x[4];
        x[0] = taca_cuda::pack2<T>(acc[nb * 4] * mul, acc[nb * 4 + 1] * mul);
        x[1] = taca_cuda::pack2<T>(acc[nb * 4 + 2] * mul, acc[nb * 4 + 3] * mul);
        x[2] = taca_cuda::pack2<T>(acc[nb * 4 + 4] * mul, acc[nb * 4 + 5] * mul);
        x[3] = taca_cuda::pack2<T>(acc[nb * 4 + 6] * mul, acc[nb * 4 + 7] * mul);
        stmatrix_x4(s + taca_sm90::sw128_offset<ROWS>(r, nb + (lane >> 4)), x);
    }
}

/* Host: dq_acc (rows x dp fp32, row-major) as a 2-D tensor map for the tensor writers (v6's TW, the D = 256 kernel):
 * boxes of 32 columns (128 bytes, the 128B swizzle's width) x box_rows rows. */
inline bool encode_acc_map(CUtensorMap *m, float *acc, int64_t rows, int dp, int box_rows) {
    taca_sm90::EncodeTiledFn fn = taca_sm90::encode_tiled_fn();
    if (!fn) return false;
    const cuuint64_t dims[2] = {(cuuint64_t)dp, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)dp * sizeof(float)};
    const cuuint32_t box[2] = {32, (cuuint32_t)box_rows}, estr[2] = {1, 1};
    return fn(m, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, acc, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace taca_bwd90

#endif /* TACA_BWD_SM90_CUH_ */
