/* PLACEHOLDER until the CPU bwd kernel lands: validates and reports unsupported. */
#include "taca.h"
int taca_bwd_cpu(const taca_bwd_params *p) {
    int st = taca_check_bwd(p);
    return st != TACA_OK ? st : TACA_ERR_UNSUPPORTED;
}
