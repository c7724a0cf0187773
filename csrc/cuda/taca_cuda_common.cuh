/*
 * taca_cuda_common.cuh: device helpers shared by the CUDA kernels (forward and backward).
 *
 * - tensor-core wrappers: mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate), ldmatrix
 *   (plain and transposed), cp.async 16-byte copies with zero fill, bf16/fp16 packing;
 * - error recording: taca_cuda_record_error() stores the text that taca_last_cuda_error()
 *   (taca.h, defined in taca_fwd.cu) returns, so every launcher reports the same way.
 *
 * Everything here is sm_80+ (mma.sync, ldmatrix, cp.async exist from Ampere on); nothing is
 * Hopper-only, so every .cu including it compiles for sm_80 and sm_90a alike.
 * Include only from .cu files: CUDA headers and taca.h, no torch, no Python.
 */
#ifndef TACA_CUDA_COMMON_CUH_
#define TACA_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "taca.h"

/* Store "<where>: <cudaGetErrorString(err)>" as the text of the last TACA_ERR_CUDA
 * (thread-local) and return TACA_ERR_CUDA. Defined in taca_fwd.cu. */
int taca_cuda_record_error(cudaError_t err, const char *where);

/* Check the last launch (cudaGetLastError) and record a failure; TACA_OK otherwise. */
static inline int taca_cuda_check_launch(const char *where) {
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? TACA_OK : taca_cuda_record_error(err, where);
}

#define TACA_CUDA_TRY(call, where)                                   \
    do {                                                             \
        cudaError_t taca_err_ = (call);                              \
        if (taca_err_ != cudaSuccess) {                              \
            (void)cudaGetLastError();                                \
            return taca_cuda_record_error(taca_err_, where);         \
        }                                                            \
    } while (0)

namespace taca_cuda {

/* Element type traits: T is __nv_bfloat16 or __half. */
template <typename T> struct TypeTraits;
template <> struct TypeTraits<__nv_bfloat16> {
    static constexpr bool is_bf16 = true;
};
template <> struct TypeTraits<__half> {
    static constexpr bool is_bf16 = false;
};

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/* Two floats to one 32-bit register of two 16-bit values, lo in the low half. */
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
    return __bfloat162float(x);
}
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}

/* D (16x8, fp32) += A (16x16, row) * B (16x8, col). Fragments as in the PTX ISA. */
template <typename T>
__device__ __forceinline__ void mma_16816(float *d, const uint32_t *a, const uint32_t *b);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float *d, const uint32_t *a,
                                                         const uint32_t *b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float *d, const uint32_t *a, const uint32_t *b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t *r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t *r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* 16-byte global->shared copy; copies src_bytes (0 or 16) and zero-fills the rest. */
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* The text spans of sample b: keys [kb, ke), queries [qb, qe). spans is NULL (the shared
 * fields apply) or the device (B, 4) int64 array {k_begin, k_end, q_begin, q_end} of taca.h,
 * already validated by the caller (0 <= begin <= end <= N). */
struct Span {
    int kb, ke, qb, qe;
};
__device__ __forceinline__ Span span_of(const int64_t *spans, int b, int kb, int ke, int qb,
                                        int qe) {
    if (spans) {
        const int64_t *r = spans + 4 * (int64_t)b;
        return Span{(int)r[0], (int)r[1], (int)r[2], (int)r[3]};
    }
    return Span{kb, ke, qb, qe};
}

/* A key mask as the CUDA kernels read it (taca.h, taca_mask): data is NULL without a mask;
 * kind TACA_MASK_BOOL (uint8, 0 = masked) or TACA_MASK_ADD (float32 added to s_ij); element
 * strides b, h, q, k over the broadcast (B, H, N_q, N_k) view. */
struct MaskArgs {
    const void *data;
    int kind;
    int64_t b, h, q, k;
};

/* The launchers' view of a taca_mask (data NULL when there is none). */
static inline MaskArgs mask_args(const taca_mask &m) {
    return MaskArgs{m.kind == TACA_MASK_NONE ? nullptr : m.data, m.kind, m.b, m.h, m.q, m.k};
}

/* The mask term of s_ij in the kernels' base-2 logit units (log2(e) * mask_ij; -inf where a
 * bool mask is 0). base = data offset of (b, h, 0, 0); i query, j key. */
__device__ __forceinline__ float mask_log2(const MaskArgs &m, int64_t base, int i, int j) {
    const int64_t off = base + (int64_t)i * m.q + (int64_t)j * m.k;
    if (m.kind == TACA_MASK_BOOL)
        return static_cast<const uint8_t *>(m.data)[off] ? 0.0f : -INFINITY;
    return static_cast<const float *>(m.data)[off] * 1.4426950408889634f;
}

/* A key mask's terms (m.q == 0: the same for every query row) of the two keys a thread holds in the
 * backward's S^T fragments, kr0 and kr0 + 8 (-inf past nk); base = data offset of (b, h, 0, 0). The
 * backward kernels read them once per query tile instead of per element (BwdArgs::mask_keys). */
__device__ __forceinline__ float2 key_mask_terms(const MaskArgs &m, int64_t base, int kr0, int nk) {
    const int64_t o = base + kr0 * m.k;
    return make_float2(kr0 < nk ? mask_log2(m, o, 0, 0) : -INFINITY,
                       kr0 + 8 < nk ? mask_log2(m, o + 8 * m.k, 0, 0) : -INFINITY);
}

/* A key mask (m.q == 0: the same for every query row): true when every key of [k0, k0 + NKEYS)
 * below nk attends with a zero mask term, so that tile can take the unmasked paths. One warp
 * votes (all 32 lanes must call it); base = data offset of (b, h, 0, 0). Padded text keys are
 * usually one tile or two: the other tiles of a masked call then run at the unmasked speed. */
template <int NKEYS>
__device__ __forceinline__ bool keys_attend(const MaskArgs &m, int64_t base, int k0, int nk, int lane) {
    bool ok = true;
#pragma unroll
    for (int c = lane; c < NKEYS; c += 32)
        if (k0 + c < nk) ok = ok && mask_log2(m, base, 0, k0 + c) == 0.0f;
    return __all_sync(0xffffffffu, ok);
}

/* *sms = the current device's SM count (the persistent kernels' grid, the backward's skew rule), queried once
 * per device. */
static inline int device_sm_count(int *sms, const char *where) {
    static int count[64];  // per device: 0 unknown
    int dev = 0;
    TACA_CUDA_TRY(cudaGetDevice(&dev), where);
    if (dev < 0 || dev >= 64) return TACA_ERR_UNSUPPORTED;
    if (count[dev] == 0) TACA_CUDA_TRY(cudaDeviceGetAttribute(&count[dev], cudaDevAttrMultiProcessorCount, dev), where);
    *sms = count[dev];
    return TACA_OK;
}

}  // namespace taca_cuda

#endif /* TACA_CUDA_COMMON_CUH_ */
