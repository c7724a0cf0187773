/*
 * taca_fwd_f16.cu: __half instances of the forward kernel (see taca_fwd.cu, taca_fwd_kernel.cuh).
 */
#include "taca_fwd_kernel.cuh"

namespace taca_fwd {

int dispatch_f16(const FwdArgs &a, int variant, bool aligned, int batch, int heads,
                cudaStream_t stream) {
    return aligned ? dispatch_dim<__half, true>(a, variant, batch, heads, stream)
                   : dispatch_dim<__half, false>(a, variant, batch, heads, stream);
}

}  // namespace taca_fwd
