/*
 * pair_relay_racecheck.cu: the v6 backward's CTA-pair hand-off (TACA_BWD_PAIR, csrc/cuda/taca_bwd_sm90_v6.cu) and
 * nothing else, race-free by the PTX rules, for asking whether compute-sanitizer racecheck follows it. A cluster of
 * two CTAs, two staging buffers of 256 floats, 64 tiles; every value is checked (a real race shows as mismatches).
 *   pull (TACA_BWD_PAIR=1): rank 1's 256 "MMA" threads store tile t into their buffer s = t & 1 and arrive on
 *     mb_full[s]; rank 1's relay (warp 8 + s, lane 0) waits for it, arrives on rank 0's peer_full[s]
 *     (release.cluster), waits on xfree[s] (acquire.cluster) and arrives on mb_empty[s], which its MMA threads
 *     wait for before tile t + 2. Rank 0's relay (warp 10, lane 0) waits on peer_full[s] (acquire.cluster),
 *     arrives on peer_ready[s], waits on peer_read[s] and arrives on rank 1's xfree[s] (release.cluster); rank 0's
 *     MMA threads wait on peer_ready[s], load rank 1's value (ld.shared::cluster), arrive on peer_read[s] and
 *     stage own + peer; its "writer" (warp 11, lane 0) checks the sums and frees the buffer (mb_empty[s]).
 *   push (TACA_BWD_PAIR=3): rank 1's MMA threads store into rank 0's buffer s (st.shared::cluster); rank 0's MMA
 *     threads add their value in place (a local load); rank 0's writer, once it read the tile, arrives on rank 1's
 *     xfree[s] (CTA-scope release, as the kernel's after its bulk read); rank 0's relay only passes peer_full on.
 *   async (TACA_BWD_PAIR=4): push by st.async, each store completing its bytes on rank 0's peer_full[s], which
 *     rank 0's relay arms with the tile's bytes (arrive.expect_tx); rank 1's relay keeps only xfree -> mb_empty.
 * Run: compute-sanitizer --tool racecheck build/pair_relay_racecheck [pull|push|async]
 * Build: nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/cuda \
 *        tests/cuda_harness/pair_relay_racecheck.cu -o build/pair_relay_racecheck
 * Result: not yet run (written in the twenty-seventh session, after the first pair form's racecheck reported
 * hazards on its DSMEM reads that the tool may not be able to order).
 */
#include <stdio.h>
#include <string.h>

#include <cuda_runtime.h>

#include "taca_sm90.cuh"

using namespace taca_sm90;

constexpr int kTiles = 64;
constexpr int kRow = 256;  // one float per MMA thread

__device__ __forceinline__ float value(int rank, int t, int i) { return static_cast<float>(rank * 1000000 + t * 1000 + i); }

__device__ __forceinline__ float ld_cluster_f32(uint32_t addr) {
    float v = 0.f;
#if TACA_SM90A
    asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
#endif
    return v;
}
__device__ __forceinline__ void st_async_f32(uint32_t addr, float v, uint32_t remote_bar) {
#if TACA_SM90A
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(addr),
                 "r"(__float_as_uint(v)), "r"(remote_bar)
                 : "memory");
#endif
}
__device__ __forceinline__ void st_cluster_f32(uint32_t addr, float v) {
#if TACA_SM90A
    asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
#endif
}

__global__ void __launch_bounds__(384, 1) pair(int *mismatches, int push) {
#if TACA_SM90A
    __shared__ __align__(128) float buf[2][kRow];
    // mb_full, mb_empty, peer_full, peer_ready, peer_read, xfree: [2] each
    __shared__ __align__(8) uint64_t bars[12];
    const uint32_t mb_full = smem_u32(&bars[0]), mb_empty = mb_full + 16, peer_full = mb_empty + 16,
                   peer_ready = peer_full + 16, peer_read = peer_ready + 16, xfree = peer_read + 16;
    const int tid = threadIdx.x, rank = static_cast<int>(blockIdx.x & 1);
    if (tid == 0) {
        for (int s = 0; s < 2; ++s) {
            mbar_init(mb_full + 8 * s, 256);
            mbar_init(mb_empty + 8 * s, 1);
            mbar_init(peer_full + 8 * s, 1);
            mbar_init(peer_ready + 8 * s, 1);
            mbar_init(peer_read + 8 * s, 256);
            mbar_init(xfree + 8 * s, 1);
        }
        mbar_init_fence();
    }
    __syncthreads();
    cluster_sync_all();
    int bad = 0;
    if (tid < 256) {  // the MMA threads
        for (int t = 0; t < kTiles; ++t) {
            const int s = t & 1;
            const uint32_t par = (t >> 1) & 1;
            if (t >= 2) mbar_wait(mb_empty + 8 * s, ((t >> 1) - 1) & 1);
            if (rank == 1) {
                if (push == 2)
                    st_async_f32(mapa_shared(smem_u32(&buf[s][tid]), 0), value(1, t, tid), mapa_shared(peer_full + 8 * s, 0));
                else if (push)
                    st_cluster_f32(mapa_shared(smem_u32(&buf[s][tid]), 0), value(1, t, tid));
                else buf[s][tid] = value(1, t, tid);
            } else {
                mbar_wait(peer_ready + 8 * s, par);
                const float v = push ? buf[s][tid] : ld_cluster_f32(mapa_shared(smem_u32(&buf[s][tid]), 1));
                const float sum = value(0, t, tid) + v;  // (the load's value used before the arrival, as the kernel)
                if (!push) mbar_arrive(peer_read + 8 * s);
                buf[s][tid] = sum;
            }
            mbar_arrive(mb_full + 8 * s);
        }
    } else if ((tid & 31) == 0) {
        const int w = (tid - 256) >> 5;  // warps 8..11
        if (rank == 1 && w < 2) {        // relay of buffer w
            for (int t = w; t < kTiles; t += 2) {
                const uint32_t par = (t >> 1) & 1;
                if (push != 2) {
                    mbar_wait(mb_full + 8 * w, par);
                    mbar_arrive_cluster(mapa_shared(peer_full + 8 * w, 0));
                }
                mbar_wait_cluster(xfree + 8 * w, par);
                mbar_arrive(mb_empty + 8 * w);
            }
        } else if (rank == 0 && w == 2) {  // relay, tiles in order
            for (int t = 0; t < kTiles; ++t) {
                const int s = t & 1;
                const uint32_t par = (t >> 1) & 1;
                if (push == 2) mbar_arrive_expect_tx(peer_full + 8 * s, kRow * 4);
                mbar_wait_cluster(peer_full + 8 * s, par);
                mbar_arrive(peer_ready + 8 * s);
                if (push) continue;
                mbar_wait(peer_read + 8 * s, par);
                mbar_arrive_cluster(mapa_shared(xfree + 8 * s, 1));
            }
        } else if (rank == 0 && w == 3) {  // the writer: checks each tile, frees the buffer
            for (int t = 0; t < kTiles; ++t) {
                const int s = t & 1;
                mbar_wait(mb_full + 8 * s, (t >> 1) & 1);
                for (int i = 0; i < kRow; ++i) bad += buf[s][i] != value(0, t, i) + value(1, t, i);
                if (push) mbar_arrive_remote_cta(mapa_shared(xfree + 8 * s, 1));
                mbar_arrive(mb_empty + 8 * s);
            }
        }
    }
    if (bad) atomicAdd(mismatches, bad);
#else
    (void)mismatches; (void)push;
#endif
}

int main(int argc, char **argv) {
    const int push = argc > 1 && !strcmp(argv[1], "push") ? 1 : argc > 1 && !strcmp(argv[1], "async") ? 2 : 0;
    int *bad = nullptr;
    if (cudaMalloc(&bad, sizeof(int)) != cudaSuccess) {
        printf("pair_relay_racecheck: cudaMalloc failed\n");
        return 2;
    }
    cudaMemset(bad, 0, sizeof(int));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(4);
    cfg.blockDim = dim3(384);
    cudaLaunchAttribute at[1] = {cluster_dim_attr(2)};
    cfg.attrs = at;
    cfg.numAttrs = 1;
    cudaError_t e = cudaLaunchKernelEx(&cfg, pair, bad, push);
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    int h = -1;
    cudaMemcpy(&h, bad, sizeof(int), cudaMemcpyDeviceToHost);
    printf("pair_relay_racecheck (%s): %s, mismatches %d\n", push == 2 ? "async" : push ? "push" : "pull",
           cudaGetErrorString(e), h);
    cudaFree(bad);
    return e == cudaSuccess && h == 0 ? 0 : 1;
}
