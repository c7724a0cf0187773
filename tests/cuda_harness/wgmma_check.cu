/*
 * wgmma_check.cu: standalone check of the Hopper operand layouts of taca_sm90.cuh, the two
 * products the sm90 forward kernel makes, on one warpgroup:
 *   S (64 x 128) = Q (64 x D) K^T (D x 128)   A, B K-major from swizzled shared memory
 *   O (64 x D)   = P (64 x 128) V (128 x D)   A from registers (bf16), B = V N-major
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

#include "taca_sm90.cuh"

using namespace taca_cuda;
using namespace taca_sm90;
using namespace taca_wgmma;
typedef __nv_bfloat16 bf;

template <int D>
__global__ void __launch_bounds__(128, 1) check_kernel(const bf *q, const bf *k, const bf *p,
                                                       const bf *v, float *s_out, float *o_out) {
#if TACA_SM90A
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t sq = base, sk = sq + 64 * D * 2, sv = sk + 128 * D * 2;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // 128 loader threads: the real kernel uses 256, so use the same helper with 128 here
    load_tile_sw128<bf, 64, D, 128>(sq, q, D, 0, 64, D, tid);
    load_tile_sw128<bf, 128, D, 128>(sk, k, D, 0, 128, D, tid);
    load_tile_sw128<bf, 128, D, 128>(sv, v, D, 0, 128, D, tid);
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
    float *ds, *dout;
    CK(cudaMalloc(&dq, hq.size() * 2)); CK(cudaMalloc(&dk, hk.size() * 2));
    CK(cudaMalloc(&dp, hp.size() * 2)); CK(cudaMalloc(&dv, hv.size() * 2));
    CK(cudaMalloc(&ds, 64 * 128 * 4)); CK(cudaMalloc(&dout, 64 * D * 4));
    CK(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dk, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dp, hp.data(), hp.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(ds, 0xff, 64 * 128 * 4)); CK(cudaMemset(dout, 0xff, 64 * D * 4));
    const int smem = (64 + 128 + 128) * D * 2 + 1024;
    CK(cudaFuncSetAttribute(check_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    check_kernel<D><<<1, 128, smem>>>(dq, dk, dp, dv, ds, dout);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<float> s(64 * 128), o(64 * D);
    CK(cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(o.data(), dout, o.size() * 4, cudaMemcpyDeviceToHost));
    double es = 0, eo = 0;
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
        }
    const bool ok = es < 1e-3 && eo < 1e-3;
    printf("wgmma_check D=%d: S=QK^T max err %.3g, O=PV max err %.3g: %s\n", D, es, eo, ok ? "ok" : "WRONG");
    cudaFree(dq); cudaFree(dk); cudaFree(dp); cudaFree(dv); cudaFree(ds); cudaFree(dout);
    return ok;
}

int main() {
    const bool ok = run<64>() & run<128>();
    printf("wgmma_check: %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}
