"""TURN (TACA_FWD_TURN=1: the persistent forward's consumers pass their ping-pong turn on across a CTA's items) alone,
for compute-sanitizer (memcheck / racecheck, and synccheck for the named barriers the turn passes through) in a short
device call; sanitize_fwd.py runs it too, among its other calls.

Run: compute-sanitizer --tool synccheck --kernel-name kns=taca_fwd python3 tests/cuda_harness/sanitize_fwd_turn.py
Several items per CTA (45 heads x 800 tokens: 315 items at D = 128 and 96, 225 at D = 64's 192-row tiles; 2 x 24
heads x 4608 tokens: FLUX 1024 CFG's 1728), the tail split off and on (its TURN instance passes the turn between whole
items; its key-range units keep the first-turn arrival), text first and last, bf16 and fp16.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import taca  # noqa: E402
from harness_env import switches  # noqa: E402


def main():
    torch.manual_seed(0)
    runs = 0
    for split in ("0", ""):
        with switches({"TACA_FWD_TURN": "1", "TACA_FWD_SPLIT": split}):
            for D, dt in ((128, torch.bfloat16), (96, torch.float16), (64, torch.bfloat16)):
                q, k, v = (torch.randn(1, 45, 800, D, device="cuda", dtype=dt) for _ in range(3))
                taca.joint_attention(q, k, v, text_len=104, text_first=D != 96, gamma=1.2, backend="cuda")
                runs += 1
            qkv = torch.randn(2, 4608, 3, 24, 128, device="cuda", dtype=torch.bfloat16)
            taca.joint_attention(*qkv.unbind(2), text_len=512, gamma=torch.tensor([1.2, 1.5], device="cuda"),
                                 layout="bnhd", backend="cuda")
            runs += 1
    torch.cuda.synchronize()
    print(f"sanitize_fwd_turn: {runs} kernel calls done")
    return runs


if __name__ == "__main__":
    main()
