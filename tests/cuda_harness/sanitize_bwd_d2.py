"""The D = 64 backward with DF and two dS' buffers (TACA_BWD_V6_D2=1) alone, for compute-sanitizer (memcheck /
racecheck), short enough for racecheck in a device call of its own (sanitize_fwd.py runs the same calls too).

Run: compute-sanitizer --tool racecheck --kernel-name kns=taca_bwd python3 tests/cuda_harness/sanitize_bwd_d2.py
Batch 1, 2 heads, 2100 tokens (17 key tiles, 17 query tiles per head: both buffers reused eight times), 77 text tokens
first: deterministic with and without DF's lead, and not deterministic.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from sanitize_fwd import _v6_switch_call  # noqa: E402


def main():
    torch.manual_seed(0)
    runs = 0
    for dt, det, lead in ((torch.bfloat16, True, "1"), (torch.float16, True, "0"), (torch.bfloat16, False, "0")):
        runs += _v6_switch_call("cuda", {"TACA_BWD_V6_D2": "1", "TACA_BWD_V6_DFLEAD": lead}, 64, dt, det)
    torch.cuda.synchronize()
    print(f"sanitize_bwd_d2: {runs} kernel calls done")
    return runs


if __name__ == "__main__":
    main()
