/*
 * namedbar_racecheck.cu: a kernel that is race-free by construction, for asking whether
 * compute-sanitizer racecheck models named barriers (bar.sync id, count) between warpgroups.
 *
 * Why: the backward's v4c variant (commit 2a04964) hands a staged fp32 tile from two MMA
 * warpgroups (threads 0..255) to a writer warpgroup (threads 256..383) through shared memory,
 * ordered by `bar.sync id, 384`; racecheck reported 4 hazards between the staging write and the
 * writer's read. This kernel does exactly that hand-off and nothing else:
 *   threads 0..255 write buf[tile & 1], then bar.sync (2 + (tile & 1)), 384;
 *   threads 256..383 bar.sync the same barrier, then read buf[tile & 1] and check the values;
 *   the next tile into the same buffer is written only after the other buffer's barrier, which
 *   the readers join after their reads (the rendezvous order of v4c).
 * Any value mismatch is counted (a real race would show up as mismatches over many tiles).
 * Run: compute-sanitizer --tool racecheck build/namedbar_racecheck
 *   hazards reported here = racecheck does not model this ordering (then v4c's report says
 *   nothing about v4c); 0 hazards = it does (then v4c's hazards deserve a real look).
 * Build: nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a \
 *        tests/cuda_harness/namedbar_racecheck.cu -o build/namedbar_racecheck
 */
#include <stdio.h>

#include <cuda_runtime.h>

__device__ __forceinline__ void bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

constexpr int kTiles = 16;
constexpr int kElems = 64 * 64;  // one staged fp32 tile

__global__ void __launch_bounds__(384, 1) handoff(int *mismatches) {
    extern __shared__ float buf[];  // [2][kElems]
    const int tid = threadIdx.x;
    int bad = 0;
    if (tid < 256) {
        for (int t = 0; t < kTiles; ++t) {
            float *b = buf + (t & 1) * kElems;
            for (int i = tid; i < kElems; i += 256) b[i] = (float)(t * kElems + i);
            bar_sync(2 + (t & 1), 384);  // tile t staged; also: readers are done with tile t - 1
        }
    } else {
        const int w = tid - 256;
        for (int t = 0; t < kTiles; ++t) {
            bar_sync(2 + (t & 1), 384);
            const float *b = buf + (t & 1) * kElems;
            for (int i = w; i < kElems; i += 128) bad += b[i] != (float)(t * kElems + i);
        }
    }
    if (bad) atomicAdd(mismatches, bad);
}

int main() {
    int *d = nullptr, h = -1;
    if (cudaMalloc(&d, sizeof(int)) != cudaSuccess || cudaMemset(d, 0, sizeof(int)) != cudaSuccess) return 2;
    const int smem = 2 * kElems * (int)sizeof(float);
    cudaFuncSetAttribute(handoff, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    handoff<<<132, 384, smem>>>(d);
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess || cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost) != cudaSuccess) {
        printf("namedbar_racecheck: CUDA error %s\n", cudaGetErrorString(e));
        return 2;
    }
    printf("namedbar_racecheck: %d value mismatches over %d CTAs x %d tiles\n", h, 132, kTiles);
    return h == 0 ? 0 : 1;
}
