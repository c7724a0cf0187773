/*
 * bulkring_racecheck.cu: a kernel that is race-free by the PTX rules, for asking whether
 * compute-sanitizer racecheck models this ordering: ordinary shared-memory loads of a ring slot,
 * then `fence.proxy.async.shared::cta` and an mbarrier arrive (release) by the readers, then the
 * producer's try_wait (acquire) on that mbarrier and a bulk copy (cp.async.bulk, the async proxy)
 * into the same slot.
 *
 * Why: the v6 backward (csrc/cuda/taca_bwd_sm90_v6.cu) loaded each query tile's lse2 / delta rows
 * into a two-slot ring this way, and racecheck reported 28 hazards between the bulk copy and the
 * MMA threads' loads of the tile two steps earlier in that slot (KERNEL_LOG "Backward v6", runs 2
 * and 3). This kernel does exactly that hand-off and nothing else:
 *   thread 256 (the producer) waits on empty[s] for the readers of tile t - 2, arms full[s] with
 *   the byte count and bulk-copies row t of a global array into slot s = t & 1;
 *   threads 0..255 (the readers) wait on full[s], read the slot with ordinary loads and check the
 *   values, fence, and arrive on empty[s]: lane 0 of each warp after __syncwarp (count 8), or with
 *   "all" every reader (count 256).
 * Any value mismatch is counted (a real race would show up as mismatches over many tiles).
 * Run: compute-sanitizer --tool racecheck build/bulkring_racecheck [all]
 * Result (H200, 2026-12-03): lane-0 arrivals 1 hazard, every reader arriving 0 hazards, no mismatch
 * in either: racecheck does not model __syncwarp as ordering the other lanes' reads before lane 0's
 * arrive; the copy engine's write is not the issue. v6 now has every MMA thread arrive (0 hazards).
 * Build: nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/cuda \
 *        tests/cuda_harness/bulkring_racecheck.cu -o build/bulkring_racecheck
 */
#include <stdio.h>

#include <cuda_runtime.h>

#include "taca_sm90.cuh"

using namespace taca_sm90;

constexpr int kTiles = 64;
constexpr int kRow = 128;  // floats per tile (BM = 128 lse2 values), 512 bytes

__global__ void __launch_bounds__(384, 1) ring(const float *src, int *mismatches, int all_arrive) {
#if TACA_SM90A
    __shared__ __align__(128) float slot[2][kRow];
    __shared__ __align__(8) uint64_t bars[4];  // full[2], empty[2]
    const uint32_t full = smem_u32(&bars[0]), empty = smem_u32(&bars[2]);
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < 2; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, all_arrive ? 256 : 8);
        }
        mbar_init_fence();
    }
    __syncthreads();
    if (tid >= 256) {
        if (tid == 256) {
            for (int t = 0; t < kTiles; ++t) {
                const int s = t & 1;
                if (t >= 2) mbar_wait(empty + 8 * s, ((t >> 1) - 1) & 1);
                mbar_arrive_expect_tx(full + 8 * s, kRow * 4);
                bulk_load(smem_u32(slot[s]), src + t * kRow, kRow * 4, full + 8 * s);
            }
        }
        return;
    }
    int bad = 0;
    for (int t = 0; t < kTiles; ++t) {
        const int s = t & 1;
        mbar_wait(full + 8 * s, (t >> 1) & 1);
        for (int i = tid & 31; i < kRow; i += 32) bad += slot[s][i] != (float)(t * kRow + i);
        fence_proxy_async();
        if (all_arrive) {
            mbar_arrive(empty + 8 * s);
        } else {
            __syncwarp();
            if ((tid & 31) == 0) mbar_arrive(empty + 8 * s);
        }
    }
    if (bad) atomicAdd(mismatches, bad);
#else
    (void)src; (void)mismatches; (void)all_arrive;
#endif
}

int main(int argc, char **argv) {
    const int all_arrive = argc > 1 && argv[1][0] == 'a';  // "all": every reader arrives (count 256)
    float *src = nullptr;
    int *bad = nullptr;
    float host[kTiles * kRow];
    for (int i = 0; i < kTiles * kRow; ++i) host[i] = (float)i;
    if (cudaMalloc(&src, sizeof(host)) != cudaSuccess || cudaMalloc(&bad, sizeof(int)) != cudaSuccess) {
        printf("bulkring_racecheck: cudaMalloc failed\n");
        return 2;
    }
    cudaMemcpy(src, host, sizeof(host), cudaMemcpyHostToDevice);
    cudaMemset(bad, 0, sizeof(int));
    ring<<<4, 384>>>(src, bad, all_arrive);
    const cudaError_t e = cudaDeviceSynchronize();
    int h = -1;
    cudaMemcpy(&h, bad, sizeof(int), cudaMemcpyDeviceToHost);
    printf("bulkring_racecheck (%s): %s, mismatches %d\n", all_arrive ? "every reader arrives" : "lane 0 arrives after __syncwarp",
           cudaGetErrorString(e), h);
    cudaFree(src);
    cudaFree(bad);
    return e == cudaSuccess && h == 0 ? 0 : 1;
}
