"""Small forward runs for compute-sanitizer (memcheck / racecheck): every kernel path once.

Run: compute-sanitizer --tool memcheck --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd.py
Uses the public op when the torch binding has CUDA (and its backward when the op has one), and
the ctypes harness (TACA_CUDA_LIB) for the unaligned path and the tiling variants.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import taca_ctypes  # noqa: E402
from harness_env import switches  # noqa: E402


def _v6_switch_call(dev, env, D, dtype, det):
    """One v6 forward + backward (2 kernel calls) with the timing switches `env` set for it, then restored: batch 1,
    2 heads, 2100 tokens (17 key tiles), 77 text tokens first, gamma 1.3."""
    import taca  # (main imports it first, inside its public-op block)

    with switches(env):
        q, k, v = (torch.randn(1, 2, 2100, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        o = taca.joint_attention(q, k, v, text_len=77, text_first=True, gamma=1.3, layout="bhnd",
                                 backend="cuda", deterministic=det)
        o.backward(torch.randn_like(o))
    return 2


def main():
    torch.manual_seed(0)
    runs = 0
    if taca_ctypes.load() is not None:
        for D in (64, 128, 40, 256):
            for var in ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18) if D in (64, 128)
                        else (0, 6, 7) if D == 256 else (0,)):
                q, k, v = (torch.randn(1, 2, 250, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                taca_ctypes.fwd(q, k, v, text_len=33, text_first=var % 2 == 0, gamma=1.2, variant=var)
                runs += 1
        # warp-specialized kernels (D = 128 and 64): several key tiles (ring wrap-around, 4 stages
        # too), N off the tile, a bnhd view
        for D in (128, 64):
            for var in (10, 11, 12, 14, 15, 16, 17, 18):  # 15, 16: wider key tiles; 17: three consumers
                q, k, v = (torch.randn(1, 700, 2, D + 8, device="cuda", dtype=torch.float16)[..., :D] for _ in range(3))
                taca_ctypes.fwd(q, k, v, text_len=77, text_first=False, gamma=1.3, layout="bnhd", variant=var)
                runs += 1
            # the persistent default over more items than two per SM (Q buffers reused, the K / V
            # ring and the turns continuing across items): 7 query tiles x 45 heads = 315 items; text 104 keys
            # (a multiple of 8) first: its boundary tile and the ragged last tile take TILE_MIXED
            q, k, v = (torch.randn(1, 45, 800, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            taca_ctypes.fwd(q, k, v, text_len=104, text_first=True, gamma=1.2, variant=0)
            runs += 1
            # and with the wider key tiles (15, 16; 18 picks one of them by key count at D = 64) and three consumer
            # warpgroups (17, the D = 64 default; 5 query tiles of 192 rows x 45 heads = 225 items), text from 700
            for var in (15, 16, 17, 18):
                taca_ctypes.fwd(q, k, v, text_len=100, text_first=False, gamma=1.2, variant=var)
                runs += 1
        buf = torch.randn(3, 1 + 2 * 130 * 65, device="cuda").half()
        q, k, v = (b[1:].view(2, 130, 65)[..., :64].unsqueeze(2) for b in buf)
        taca_ctypes.fwd(q, k, v, text_len=7, text_first=False, gamma=0.8, layout="bnhd")
        runs += 1
    try:
        import taca

        q, k, v = (torch.randn(2, 150, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        o = taca.joint_attention(q, k, v, text_len=20, gamma=torch.tensor([1.2, 1.5], device="cuda"),
                                 layout="bnhd", backend="cuda")
        runs += 1
        o.sum().backward()
        runs += 1
        # backward with N not a multiple of the 128-key tile: D=128 (several key tiles, ordered
        # dQ chains), D=64 with one key tile and with several (4 query tiles: both dQ staging
        # buffers of the sm_90 writer warpgroup are reused); on sm_90 these take the wgmma backward
        cases = ((1, 300, 128, 77, True, torch.bfloat16), (2, 100, 64, 33, False, torch.float16),
                 (1, 400, 64, 50, True, torch.bfloat16))
        for B, N, D, L, tf, dt in cases:
            q, k, v = (torch.randn(B, 2, N, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
            o = taca.joint_attention(q, k, v, text_len=L, text_first=tf, gamma=1.3, layout="bhnd",
                                     backend="cuda")
            o.backward(torch.randn_like(o))
            runs += 2
        # several deterministic dQ chains (taca_bwd.cu layout_of: one per 8 key tiles, 4 at most, 3 from 48 (batch,
        # head) pairs); the small cases above have one: FLUX 1024 b2's pairs at 4096 keys (32 key tiles)
        q, k, v = (torch.randn(2, 24, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        o = taca.joint_attention(q, k, v, text_len=77, text_first=True, gamma=1.3, layout="bhnd", backend="cuda")
        o.backward(torch.randn_like(o))
        runs += 2
        # deterministic=False (unordered dQ adds; v6 counts each tile's adds for its overlapped conversion)
        for B, N, D, L, tf, dt in cases[::2]:
            q, k, v = (torch.randn(B, 2, N, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
            o = taca.joint_attention(q, k, v, text_len=L, text_first=tf, gamma=1.3, layout="bhnd",
                                     backend="cuda", deterministic=False)
            o.backward(torch.randn_like(o))
            runs += 2
        # the padded head dims on the warp-specialized forward (D = 72..120 at 128, the opt-in D = 256 kernel)
        import sanitize_fwd_pad  # (imports taca: here, inside the public-op block)

        runs += sanitize_fwd_pad.main()
        # the op's features on the kernels (FEAT instances and grouped / cross shapes): per-sample
        # spans, a bool key mask with padded keys, a float (B, H, N_q, N_k) mask with a fully
        # masked row, image-only queries against [image, text] keys, grouped KV heads
        dev = "cuda"
        for D, dt in ((64, torch.bfloat16), (128, torch.float16), (96, torch.bfloat16), (72, torch.float16),
                      (256, torch.bfloat16)):
            B, H, Hkv, Nq, Nk = 2, 4, 2, 190, 230
            q = torch.randn(B, H, Nq, D, device=dev, dtype=dt, requires_grad=True)
            k, v = (torch.randn(B, Hkv, Nk, D, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
            km = torch.ones(B, 1, 1, Nk, dtype=torch.bool, device=dev)
            km[1, ..., Nk - 30:] = False
            fm = torch.randn(B, H, Nq, Nk, device=dev)
            fm[0, 1, 5] = float("-inf")
            span_kw = dict(text_len=torch.tensor([40, 0], device=dev), text_start=torch.tensor([0, 100], device=dev),
                           query_text_len=torch.tensor([20, 10], device=dev))
            for kw in (dict(span_kw), dict(span_kw, attn_mask=km), dict(text_len=64, text_first=False, attn_mask=fm)):
                o = taca.joint_attention(q, k, v, gamma=1.3, backend="cuda", **kw)
                o.backward(torch.randn_like(o))
                runs += 2
        # a key mask at D = 64 over several query and key tiles (the three-consumer kernel's per-tile terms, persistent:
        # 5 query tiles of 192 rows x 45 heads), padded keys past 750 in sample 0 only
        q, k, v = (torch.randn(2, 45, 800, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
        km = torch.ones(2, 1, 1, 800, dtype=torch.bool, device=dev)
        km[0, ..., 750:] = False
        taca.joint_attention(q, k, v, text_len=104, text_first=True, gamma=1.2, attn_mask=km, backend="cuda")
        runs += 1
        # the mma.sync backward (what GPUs other than Hopper run; TACA_BWD_SM90=0 forces it on sm_90, where the cases
        # above take the wgmma kernels): several dQ chains (17 key tiles), D = 64 with a key mask, D = 256 (two column
        # chunks per key tile), deterministic and not
        os.environ["TACA_BWD_SM90"] = "0"
        try:
            for B, N, D, dt, masked, det in ((1, 2100, 128, torch.bfloat16, False, True),
                                             (2, 1100, 64, torch.float16, True, True),
                                             (1, 700, 256, torch.bfloat16, False, True),
                                             (1, 2100, 128, torch.bfloat16, False, False)):
                q, k, v = (torch.randn(B, 2, N, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
                km = None
                if masked:
                    km = torch.ones(B, 1, 1, N, dtype=torch.bool, device=dev)
                    km[-1, ..., N - 70:] = False
                o = taca.joint_attention(q, k, v, text_len=77, text_first=True, gamma=1.3, layout="bhnd",
                                         attn_mask=km, backend="cuda", deterministic=det)
                o.backward(torch.randn_like(o))
                runs += 2
        finally:
            del os.environ["TACA_BWD_SM90"]
        # v6 with each tile's dQ staged at the next tile's top forced on (TACA_BWD_V6_DS=1 with TACA_BWD_V6_DF=0: the
        # earlier default at D = 72..128, a switch at D = 64): D = 128 (17 key tiles, 33 query tiles per head)
        # deterministic and not, D = 64 (the tensor writer) deterministic; then D = 128 with it off (TACA_BWD_V6_DS=0)
        for D, dt, det, ds in ((128, torch.bfloat16, True, "1"), (128, torch.bfloat16, False, "1"),
                               (64, torch.float16, True, "1"), (128, torch.bfloat16, True, "0")):
            runs += _v6_switch_call(dev, {"TACA_BWD_V6_DS": ds, "TACA_BWD_V6_DF": "0"}, D, dt, det)
        # v6 with each tile's dQ product at the next tile (DF, the default at D = 72..128: no CTA barrier in the loop):
        # D = 128 deterministic with and without its lead, and not deterministic; D = 64 (a switch there, the tensor writer)
        for D, dt, det, lead in ((128, torch.bfloat16, True, "1"), (128, torch.float16, True, "0"),
                                 (128, torch.bfloat16, False, "1"), (64, torch.bfloat16, True, "1")):
            runs += _v6_switch_call(dev, {"TACA_BWD_V6_DF": "1", "TACA_BWD_V6_DFLEAD": lead}, D, dt, det)
        # D2 (D = 64: DF with two dS' buffers, a switch): sanitize_bwd_d2.py's calls
        import sanitize_bwd_d2

        runs += sanitize_bwd_d2.main()
        # the D = 128 tail split (TACA_FWD_SPLIT): sanitize_fwd_split.py's calls
        import sanitize_fwd_split

        runs += sanitize_fwd_split.main()
        # TURN (the consumers' turn across items, TACA_FWD_TURN=1): sanitize_fwd_turn.py's calls
        import sanitize_fwd_turn

        runs += sanitize_fwd_turn.main()
    except (NotImplementedError, RuntimeError, AttributeError) as e:
        print("public op path skipped:", type(e).__name__, str(e)[:200])
    torch.cuda.synchronize()
    print(f"sanitize_fwd: {runs} kernel calls done")


if __name__ == "__main__":
    main()
