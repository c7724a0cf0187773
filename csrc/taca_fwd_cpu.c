/* PLACEHOLDER until the CPU fwd kernel lands: validates and reports unsupported. */
#include "taca.h"
int taca_fwd_cpu(const taca_fwd_params *p) {
    int st = taca_check_fwd(p);
    return st != TACA_OK ? st : TACA_ERR_UNSUPPORTED;
}
