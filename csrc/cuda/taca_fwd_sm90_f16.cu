/*
 * taca_fwd_sm90_f16.cu: the __half kernels of the Hopper forward (taca_fwd_sm90.cu, compiled a second time with
 * TACA_FWD90_HALF_PART: only dispatch_t<__half>, as taca_fwd90::dispatch_half). A translation unit of their own so
 * the build compiles the two halves in parallel; the entry points, the bf16 kernels and the FP8 forward stay in
 * taca_fwd_sm90.cu.
 */
#define TACA_FWD90_HALF_PART 1
#include "taca_fwd_sm90.cu"
