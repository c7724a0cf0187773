/*
 * taca_bwd_d64.cu: the backward kernels for head dims padded to 64 (DP, DC, BM = 64, 64, 128),
 * bf16 and fp16. One head-dim class per file keeps compiles parallel; see taca_bwd.cu.
 * Build check: nvcc -std=c++17 -O3 -Icsrc -Icsrc/cuda -gencode=arch=compute_90a,code=sm_90a \
 *   -c csrc/cuda/taca_bwd_d64.cu -o /tmp/x.o -Xptxas -v
 */
#include "taca_bwd_kernel.cuh"

namespace taca_bwd {

int launch_d64(const BwdArgs &a, cudaStream_t stream, bool bf16) {
    return bf16 ? launch_bwd<__nv_bfloat16, 64, 64, 128>(a, stream)
                : launch_bwd<__half, 64, 64, 128>(a, stream);
}

}  // namespace taca_bwd
