/*
 * taca_fwd_bf16.cu: __nv_bfloat16 instances of the forward kernel (see taca_fwd.cu, taca_fwd_kernel.cuh).
 */
#include "taca_fwd_kernel.cuh"

namespace taca_fwd {

int dispatch_bf16(const FwdArgs &a, int variant, bool aligned, int batch, int heads,
                 cudaStream_t stream) {
    return aligned ? dispatch_dim<__nv_bfloat16, true>(a, variant, batch, heads, stream)
                   : dispatch_dim<__nv_bfloat16, false>(a, variant, batch, heads, stream);
}

}  // namespace taca_fwd
