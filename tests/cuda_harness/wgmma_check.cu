/*
 * wgmma_check.cu: standalone check of the Hopper operand layouts of taca_sm90.cuh, the
 * products the sm90 forward and backward kernels make, on one warpgroup:
 *   S (64 x 128) = Q (64 x D) K^T (D x 128)   A, B K-major from swizzled shared memory
 *   O (64 x D)   = P (64 x 128) V (128 x D)   A from registers (bf16), B = V N-major
 *   O again, with A = P from swizzled shared memory (K-major) and B = V N-major: the
 *                                             backward's dQ = dS K (wgmma_ss TA=0, TB=1)
 *   at D = 128, both O products again as one m64n128 instruction per k-step (B = V N-major over
 *   its two 64-column blocks, desc_sw128_mn with the blocks' stride as leading byte offset): RS is
 *   the backward's dV and dK form; SS was a one-warpgroup dQ's (dropped, KERNEL_LOG) and stays as
 *   the check of that generated form (computed in a loop with RS: both at once made ptxas
 *   serialize this harness's wgmmas for registers)
 *   S (64 x N) = Q K^T for N = 160, 192, 256 (the forward's wider benchmark key tiles, WsCfg's BC) and N = 32
 *   (the D = 256 backward's S^T / dP^T per warpgroup), one instruction per k-step, K's N rows swizzled as the
 *   kernel's TMA boxes lay them out
 *   S^T stored by store_block_trans (stmatrix .trans, taca_bwd_sm90.cuh) from the packed S
 *   fragments into a K-major tile (128 rows x 64): the backward's dS^T -> dS; exact match
 * for D = 64 and 128, against float64 products on the host of the same bf16 values.
 * Build and run on an sm_90 GPU:
 *   nvcc -std=c++17 -O2 -Icsrc -Icsrc/cuda -gencode=arch=compute_90a,code=sm_90a \
 *        tests/cuda_harness/wgmma_check.cu -o /tmp/wgmma_check && /tmp/wgmma_check
 * Prints the max abs error per product and "wgmma_check: PASS" or "FAIL"; exit code 0 on pass.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include "taca_bwd_sm90.cuh"
#include "taca_sm90.cuh"

using namespace taca_cuda;
using namespace taca_sm90;
using namespace taca_wgmma;
using namespace taca_bwd90;
typedef __nv_bfloat16 bf;

template <int D>
__global__ void __launch_bounds__(128, 1) check_kernel(const bf *q, const bf *k, const bf *p,
                                                       const bf *v, float *s_out, float *o_out,
                                                       float *o2_out, float *st_out, float *o3_out,
                                                       float *o4_out) {
#if TACA_SM90A
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t sq = base, sk = sq + 64 * D * 2, sv = sk + 128 * D * 2;
    const uint32_t sp = sv + 128 * D * 2, sst = sp + 64 * 128 * 2;  // P (64 x 128), S^T (128 x 64)
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // 128 loader threads: the real kernel uses 256, so use the same helper with 128 here
    load_tile_sw128<bf, 64, D, 128>(sq, q, D, 0, 64, D, tid);
    load_tile_sw128<bf, 128, D, 128>(sk, k, D, 0, 128, D, tid);
    load_tile_sw128<bf, 128, D, 128>(sv, v, D, 0, 128, D, tid);
    load_tile_sw128<bf, 64, 128, 128>(sp, p, 128, 0, 64, 128, tid);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();

    float s[64];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        wgmma_ss<bf, 128, 0, 0>(s, desc_sw128(sq + (kk >> 2) * 64 * 128 + (kk & 3) * 32),
                                desc_sw128(sk + (kk >> 2) * 128 * 128 + (kk & 3) * 32), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<64>(s);
    for (int nt = 0; nt < 16; ++nt)
        for (int e = 0; e < 4; ++e) {
            const int row = warp * 16 + (lane >> 2) + (e >> 1) * 8, col = nt * 8 + (lane & 3) * 2 + (e & 1);
            s_out[row * 128 + col] = s[nt * 4 + e];
        }

    // P fragments straight from global (row-major 64 x 128), the A-register layout
    uint32_t pa[8][4];
    for (int kk = 0; kk < 8; ++kk)
        for (int r = 0; r < 4; ++r) {
            const int row = warp * 16 + (lane >> 2) + (r & 1) * 8, col = kk * 16 + (lane & 3) * 2 + (r >> 1) * 8;
            pa[kk][r] = *reinterpret_cast<const uint32_t *>(p + row * 128 + col);
        }
    float o[D / 2];
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    fence_regs<D / 2>(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
#pragma unroll
        for (int hb = 0; hb < D / 64; ++hb)
            wgmma_rs<bf, 64, 1>(o + hb * 32, pa[kk], desc_sw128(sv + hb * 128 * 128 + kk * 16 * 128), 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<D / 2>(o);
    for (int nt = 0; nt < D / 8; ++nt)
        for (int e = 0; e < 4; ++e) {
            const int row = warp * 16 + (lane >> 2) + (e >> 1) * 8, col = nt * 8 + (lane & 3) * 2 + (e & 1);
            o_out[row * D + col] = o[nt * 4 + e];
        }

    // O = P V with P from shared memory (K-major A) and V N-major: wgmma_ss TA=0, TB=1
    float o2[D / 2];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
#pragma unroll
        for (int hb = 0; hb < D / 64; ++hb)
            wgmma_ss<bf, 64, 0, 1>(o2 + hb * 32, desc_sw128(sp + (kk >> 2) * 64 * 128 + (kk & 3) * 32),
                                   desc_sw128(sv + hb * 128 * 128 + kk * 16 * 128), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<D / 2>(o2);
    for (int nt = 0; nt < D / 8; ++nt)
        for (int e = 0; e < 4; ++e) {
            const int row = warp * 16 + (lane >> 2) + (e >> 1) * 8, col = nt * 8 + (lane & 3) * 2 + (e & 1);
            o2_out[row * D + col] = o2[nt * 4 + e];
        }

    if constexpr (D == 128) {  // N = 128 in one instruction: RS (o3), then SS (o4)
#pragma unroll 1
        for (int form = 0; form < 2; ++form) {
            float o3[64];
            for (int i = 0; i < 64; ++i) o3[i] = 0.0f;
            fence_regs<64>(o3);
            wgmma_fence();
            if (form == 0) {
#pragma unroll
                for (int kk = 0; kk < 8; ++kk)
                    wgmma_rs<bf, 128, 1>(o3, pa[kk], desc_sw128_mn(sv + kk * 16 * 128, 128 * 128), 1);
            } else {
#pragma unroll
                for (int kk = 0; kk < 8; ++kk)
                    wgmma_ss<bf, 128, 0, 1>(o3, desc_sw128(sp + (kk >> 2) * 64 * 128 + (kk & 3) * 32),
                                            desc_sw128_mn(sv + kk * 16 * 128, 128 * 128), kk > 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs<64>(o3);
            float *dst = form == 0 ? o3_out : o4_out;
            for (int nt = 0; nt < 16; ++nt)
                for (int e = 0; e < 4; ++e) {
                    const int row = warp * 16 + (lane >> 2) + (e >> 1) * 8, col = nt * 8 + (lane & 3) * 2 + (e & 1);
                    dst[row * D + col] = o3[nt * 4 + e];
                }
        }
    }

    // S^T through stmatrix .trans: pack S (rows = q, columns = k) as A fragments, store transposed
    for (int kk = 0; kk < 8; ++kk) {
        uint32_t sa[4];
        for (int r = 0; r < 4; ++r) sa[r] = pack2<bf>(s[(2 * kk + (r >> 1)) * 4 + (r & 1) * 2],
                                                      s[(2 * kk + (r >> 1)) * 4 + (r & 1) * 2 + 1]);
        store_block_trans<128>(sst, sa, warp * 16, kk * 16, lane);
    }
    __syncthreads();
    const unsigned char *tile = smem_raw + (sst - smem_u32(smem_raw));
    for (int i = tid; i < 128 * 64; i += 128) {
        const int r = i / 64, c = i % 64;
        st_out[i] = __bfloat162float(*reinterpret_cast<const bf *>(tile + sw128_offset<128>(r, c >> 3) + (c & 7) * 2));
    }
#endif
}

/* S (64 x N) = Q K^T with one m64nNk16 per k-step: N rows of K in 64-column blocks of N x 128 bytes. */
template <int D, int N>
__global__ void __launch_bounds__(128, 1) check_s_wide(const bf *q, const bf *k, float *s_out) {
#if TACA_SM90A
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t sq = (smem_u32(smem_raw) + 1023u) & ~1023u, sk = sq + 64 * D * 2;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    load_tile_sw128<bf, 64, D, 128>(sq, q, D, 0, 64, D, tid);
    load_tile_sw128<bf, N, D, 128>(sk, k, D, 0, N, D, tid);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    float s[N / 2];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        wgmma_ss<bf, N, 0, 0>(s, desc_sw128(sq + (kk >> 2) * 64 * 128 + (kk & 3) * 32),
                              desc_sw128(sk + (kk >> 2) * N * 128 + (kk & 3) * 32), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<N / 2>(s);
    for (int nt = 0; nt < N / 8; ++nt)
        for (int e = 0; e < 4; ++e) {
            const int row = warp * 16 + (lane >> 2) + (e >> 1) * 8, col = nt * 8 + (lane & 3) * 2 + (e & 1);
            s_out[row * N + col] = s[nt * 4 + e];
        }
#endif
}

#define CK(x)                                                                          \
    do {                                                                               \
        cudaError_t e_ = (x);                                                          \
        if (e_ != cudaSuccess) {                                                       \
            printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
            exit(2);                                                                   \
        }                                                                              \
    } while (0)

template <int D>
bool run() {
    std::vector<bf> hq(64 * D), hk(128 * D), hp(64 * 128), hv(128 * D);
    std::vector<float> fq(64 * D), fk(128 * D), fp(64 * 128), fv(128 * D);
    srand(1234 + D);
    auto fill = [](std::vector<bf> &h, std::vector<float> &f) {
        for (size_t i = 0; i < h.size(); ++i) {
            h[i] = __float2bfloat16((float)rand() / RAND_MAX * 2.0f - 1.0f);
            f[i] = __bfloat162float(h[i]);
        }
    };
    fill(hq, fq); fill(hk, fk); fill(hp, fp); fill(hv, fv);
    bf *dq, *dk, *dp, *dv;
    float *ds, *dout, *do2, *dst, *do3, *do4;
    CK(cudaMalloc(&dq, hq.size() * 2)); CK(cudaMalloc(&dk, hk.size() * 2));
    CK(cudaMalloc(&dp, hp.size() * 2)); CK(cudaMalloc(&dv, hv.size() * 2));
    CK(cudaMalloc(&ds, 64 * 128 * 4)); CK(cudaMalloc(&dout, 64 * D * 4));
    CK(cudaMalloc(&do2, 64 * D * 4)); CK(cudaMalloc(&dst, 128 * 64 * 4));
    CK(cudaMalloc(&do3, 64 * D * 4)); CK(cudaMalloc(&do4, 64 * D * 4));
    CK(cudaMemset(do3, 0xff, 64 * D * 4)); CK(cudaMemset(do4, 0xff, 64 * D * 4));
    CK(cudaMemset(do2, 0xff, 64 * D * 4)); CK(cudaMemset(dst, 0xff, 128 * 64 * 4));
    CK(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dk, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dp, hp.data(), hp.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(ds, 0xff, 64 * 128 * 4)); CK(cudaMemset(dout, 0xff, 64 * D * 4));
    const int smem = (64 + 128 + 128) * D * 2 + 2 * 64 * 128 * 2 + 1024;
    CK(cudaFuncSetAttribute(check_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    check_kernel<D><<<1, 128, smem>>>(dq, dk, dp, dv, ds, dout, do2, dst, do3, do4);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<float> s(64 * 128), o(64 * D), o2(64 * D), st(128 * 64), o3(64 * D), o4(64 * D);
    CK(cudaMemcpy(o3.data(), do3, o3.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(o4.data(), do4, o4.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(o2.data(), do2, o2.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(st.data(), dst, st.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(o.data(), dout, o.size() * 4, cudaMemcpyDeviceToHost));
    double es = 0, eo = 0, eo2 = 0, eo3 = 0, eo4 = 0;
    long bad_st = 0;
    for (int i = 0; i < 64; ++i)
        for (int j = 0; j < 128; ++j) {
            double r = 0;
            for (int c = 0; c < D; ++c) r += (double)fq[i * D + c] * fk[j * D + c];
            const double e = fabs(r - s[i * 128 + j]);
            es = (e == e && es == es) ? fmax(es, e) : NAN;
        }
    for (int i = 0; i < 64; ++i)
        for (int c = 0; c < D; ++c) {
            double r = 0;
            for (int j = 0; j < 128; ++j) r += (double)fp[i * 128 + j] * fv[j * D + c];
            const double e = fabs(r - o[i * D + c]);
            eo = (e == e && eo == eo) ? fmax(eo, e) : NAN;
            const double e2 = fabs(r - o2[i * D + c]);
            eo2 = (e2 == e2 && eo2 == eo2) ? fmax(eo2, e2) : NAN;
            if (D == 128) {
                const double e3 = fabs(r - o3[i * D + c]), e4 = fabs(r - o4[i * D + c]);
                eo3 = (e3 == e3 && eo3 == eo3) ? fmax(eo3, e3) : NAN;
                eo4 = (e4 == e4 && eo4 == eo4) ? fmax(eo4, e4) : NAN;
            }
        }
    for (int i = 0; i < 64; ++i)
        for (int j = 0; j < 128; ++j)
            bad_st += st[j * 64 + i] != __bfloat162float(__float2bfloat16(s[i * 128 + j]));
    const bool ok = es < 1e-3 && eo < 1e-3 && eo2 < 1e-3 && eo3 < 1e-3 && eo4 < 1e-3 && bad_st == 0;
    printf("wgmma_check D=%d: S=QK^T max err %.3g, O=PV max err %.3g, O=PV (SS TA=0 TB=1) max err %.3g, "
           "O=PV n128 (RS) %.3g, (SS) %.3g, S^T by stmatrix.trans: %ld mismatches: %s\n", D, es, eo, eo2, eo3, eo4,
           bad_st, ok ? "ok" : "WRONG");
    cudaFree(dq); cudaFree(dk); cudaFree(dp); cudaFree(dv); cudaFree(ds); cudaFree(dout);
    cudaFree(do2); cudaFree(dst); cudaFree(do3); cudaFree(do4);
    return ok;
}

template <int D, int N>
bool run_wide() {
    std::vector<bf> hq(64 * D), hk(N * D);
    std::vector<float> fq(64 * D), fk(N * D), s(64 * N);
    srand(99 + D + N);
    for (size_t i = 0; i < hq.size(); ++i) fq[i] = __bfloat162float(hq[i] = __float2bfloat16((float)rand() / RAND_MAX * 2.0f - 1.0f));
    for (size_t i = 0; i < hk.size(); ++i) fk[i] = __bfloat162float(hk[i] = __float2bfloat16((float)rand() / RAND_MAX * 2.0f - 1.0f));
    bf *dq, *dk;
    float *ds;
    CK(cudaMalloc(&dq, hq.size() * 2)); CK(cudaMalloc(&dk, hk.size() * 2)); CK(cudaMalloc(&ds, s.size() * 4));
    CK(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dk, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(ds, 0xff, s.size() * 4));
    const int smem = (64 + N) * D * 2 + 1024;
    CK(cudaFuncSetAttribute(check_s_wide<D, N>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    check_s_wide<D, N><<<1, 128, smem>>>(dq, dk, ds);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost));
    double es = 0;
    for (int i = 0; i < 64; ++i)
        for (int j = 0; j < N; ++j) {
            double r = 0;
            for (int c = 0; c < D; ++c) r += (double)fq[i * D + c] * fk[j * D + c];
            const double e = fabs(r - s[i * N + j]);
            es = (e == e && es == es) ? fmax(es, e) : NAN;
        }
    const bool ok = es < 1e-3;
    printf("wgmma_check D=%d: S=QK^T m64n%dk16 max err %.3g: %s\n", D, N, es, ok ? "ok" : "WRONG");
    cudaFree(dq); cudaFree(dk); cudaFree(ds);
    return ok;
}

int main() {
    bool ok = run<64>() & run<128>();
    ok &= run_wide<64, 192>() & run_wide<64, 256>() & run_wide<128, 160>() & run_wide<128, 192>();
    ok &= run_wide<128, 32>();  // m64n32k16: the D = 256 backward's S^T / dP^T (taca_bwd_sm90_d256.cu)
    printf("wgmma_check: %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}
