"""Head dims 72..120 on the D = 128 warp-specialized forward (TMA boxes past D zero-filled, stores up to D) alone, for
compute-sanitizer (memcheck / racecheck) in a short device call (sanitize_fwd.py runs it too, among its other calls).

Run: compute-sanitizer --tool memcheck --kernel-name kns=taca_fwd python3 tests/cuda_harness/sanitize_fwd_pad.py
D = 96 and 72 in a (B, N, H, D) view of wider storage (the columns past D hold other heads' values, which the copy
engine must not read): the plain kernel at FLUX 1024's 24 heads x 4608 tokens (36 key tiles; 864 items leave a
partial last wave on 132 SMs: the tail split), per-sample text spans, a bool key mask with padded keys and grouped KV
heads (Lumina 2's kind), fp16 and bf16; with TACA_CUDA_LIB set, the D = 256 warp-specialized kernel (ctypes
variant 10) at D = 256 and 224 too; and its FEAT instances through the public op (TACA_FWD_D256=ws): per-sample spans,
a bool key mask with spans, a float per-query mask.
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
    dev = "cuda"
    for D, dt in ((96, torch.bfloat16), (72, torch.float16)):
        qkv = torch.randn(1, 4608, 3, 24, D, device=dev, dtype=dt)
        taca.joint_attention(*qkv.unbind(2), text_len=512, text_first=True, gamma=1.2, layout="bnhd", backend="cuda")
        runs += 1
        B, H, Hkv, N = 2, 6, 2, 700
        q = torch.randn(B, N, H, D, device=dev, dtype=dt)
        kv = torch.randn(B, N, 2, Hkv, D, device=dev, dtype=dt)
        km = torch.ones(B, 1, 1, N, dtype=torch.bool, device=dev)
        km[1, ..., 40:90] = False
        spans = dict(text_len=torch.tensor([90, 40], device=dev))
        for kw in (spans, dict(spans, attn_mask=km)):
            taca.joint_attention(q, kv[:, :, 0], kv[:, :, 1], gamma=1.2, layout="bnhd", backend="cuda", **kw)
            runs += 1
    # the opt-in warp-specialized kernel at D = 256 (ctypes variant 10; 224 zero-filled), through the ctypes harness
    lib = os.environ.get("TACA_CUDA_LIB")
    if lib and os.path.exists(lib):
        import taca_ctypes

        for D, dt in ((256, torch.bfloat16), (224, torch.float16)):
            qkv = torch.randn(2, 700, 3, 3, D, device=dev, dtype=dt)
            taca_ctypes.fwd(*qkv.unbind(2), text_len=150, text_first=False, gamma=torch.tensor([1.2, 1.5], device=dev),
                            layout="bnhd", variant=10)
            runs += 1
    # the D = 256 warp-specialized kernel's FEAT instances (spans; a key mask's terms; any mask), through the public op
    with switches({"TACA_FWD_D256": "ws"}):
        B, H, N, D = 2, 3, 700, 256
        q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        km = torch.ones(B, 1, 1, N, dtype=torch.bool, device=dev)
        km[0, ..., 100:170] = False
        fm = torch.randn(B, H, N, N, device=dev, dtype=torch.bfloat16)
        spans = dict(text_len=torch.tensor([170, 512], device=dev))
        for kw in (spans, dict(spans, attn_mask=km), dict(text_len=50, attn_mask=fm)):
            taca.joint_attention(q, k, v, gamma=1.2, layout="bnhd", backend="cuda", **kw)
            runs += 1
    torch.cuda.synchronize()
    print(f"sanitize_fwd_pad: {runs} kernel calls done")
    return runs


if __name__ == "__main__":
    main()
