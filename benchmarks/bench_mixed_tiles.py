"""What a forward key tile that is not uniform costs: the text / image boundary inside a tile, or the last tile
ragged (keys past N_k), against shapes whose every tile is uniform, same number of query and key tiles.

The warp-specialized forward runs a uniform tile (all image keys or all text keys, every key < N_k) with one
multiplier per row (TILE_VIS / TILE_TXT); any other tile takes the per-element TILE_MIXED softmax. The cases
differ only in where the text lies and in N by less than one tile, so the tile counts are equal and the time
difference is the MIXED tiles' extra cost. The "8" cases put the boundary on an 8-key group (what the dropped
TILE_GROUP forms needed: KERNEL_LOG, eighteenth session); on main they run TILE_MIXED like the others. The ctypes harness (tests/cuda_harness) with preallocated outputs;
each case is timed in rounds that alternate the cases (triton do_bench, median of medians).

Run: TACA_CUDA_LIB=build/libtaca_fwd_ctypes.so python benchmarks/bench_mixed_tiles.py --out DIR [--rounds 5]
Profile one case: ncu --kernel-name regex:taca_fwd --launch-skip 1 --launch-count 1 ... \
     python benchmarks/bench_mixed_tiles.py --once d64_160_sd35m
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "cuda_harness"))

# (name, B, H, D, N, text_len, text_first, variant, the case it is compared with, what the key tiles are)
CASES = [
    # D = 64 (SD3.5-M CFG heads), variant 10 = the persistent kernel with 128-key tiles: 35 key tiles
    ("d64_uniform", 2, 24, 64, 4480, 384, False, 10, "", "35 tiles, none mixed (text 4096..4480)"),
    ("d64_ragged", 2, 24, 64, 4429, 333, False, 10, "d64_uniform", "last tile ragged (4352..4429, text)"),
    ("d64_boundary", 2, 24, 64, 4480, 435, False, 10, "d64_uniform", "boundary mid-tile (4045 in 3968..4096)"),
    ("d64_boundary8", 2, 24, 64, 4480, 440, False, 10, "d64_uniform", "boundary mid-tile on an 8-key group (4040)"),
    ("d64_both", 2, 24, 64, 4429, 384, False, 10, "d64_uniform", "boundary mid-tile and the last tile ragged"),
    ("d64_both8", 2, 24, 64, 4429, 389, False, 10, "d64_uniform", "boundary mid-tile (4040) and the last tile ragged"),
    # D = 64 with the default rule's 160-key tiles (variant 16): the SD3.5-M shape as the public op runs it
    ("d64_160_sd35m", 2, 24, 64, 4429, 333, False, 16, "d64_160_uniform", "28 tiles: boundary 4096 in 4000..4160, last ragged"),
    ("d64_160_uniform", 2, 24, 64, 4480, 320, False, 16, "", "28 tiles, none mixed (text 4160..4480)"),
    # D = 128 (FLUX heads), variant 0 = the default persistent kernel, 128-key tiles: 36 key tiles
    ("d128_uniform", 1, 24, 128, 4608, 512, True, 0, "", "36 tiles, none mixed (FLUX 1024)"),
    ("d128_boundary", 1, 24, 128, 4608, 500, True, 0, "d128_uniform", "boundary mid-tile (500 in 384..512)"),
    ("d128_boundary8", 1, 24, 128, 4608, 504, True, 0, "d128_uniform", "boundary mid-tile on an 8-key group (504)"),
    ("d128_ragged", 1, 24, 128, 4600, 512, True, 0, "d128_uniform", "last tile ragged (4480..4600)"),
    # PERFORMANCE.md shapes through the default dispatch (variant 0), for A/B runs of two builds
    ("sd35m_cfg", 2, 24, 64, 4429, 333, False, 0, "", "SD3.5-M CFG 1024 (the default key tile)"),
    ("sd35l_cfg", 2, 38, 64, 4429, 333, False, 0, "", "SD3.5-L CFG 1024"),
    ("flux1024_b1", 1, 24, 128, 4608, 512, True, 0, "", "FLUX 1024, 36 uniform tiles"),
    ("flux1024_b2", 2, 24, 128, 4608, 512, True, 0, "", "FLUX 1024 batch 2"),
    # the default's kernels by their variant numbers (160-key tiles at D = 64: 16, 128-key tiles at D = 128: 10): on
    # main the same kernels as variant 0 above, so the pairs are an in-process control; a build whose default
    # differs (the dropped TILE_GROUP instances) is A/B-timed against them in one process
    ("d64_160_uniform_v0", 2, 24, 64, 4480, 320, False, 0, "d64_160_uniform", "= d64_160_uniform through the default"),
    ("sd35m_cfg_v16", 2, 24, 64, 4429, 333, False, 16, "sd35m_cfg", "= sd35m_cfg by variant number"),
    ("sd35l_cfg_v16", 2, 38, 64, 4429, 333, False, 16, "sd35l_cfg", "= sd35l_cfg by variant number"),
    ("d128_boundary8_v10", 1, 24, 128, 4608, 504, True, 10, "d128_boundary8", "= d128_boundary8 by variant number"),
    ("d128_ragged_v10", 1, 24, 128, 4600, 512, True, 10, "d128_ragged", "= d128_ragged by variant number"),
    ("flux1024_b1_v10", 1, 24, 128, 4608, 512, True, 10, "flux1024_b1", "= flux1024_b1 by variant number"),
    ("flux1024_b2_v10", 2, 24, 128, 4608, 512, True, 10, "flux1024_b2", "= flux1024_b2 by variant number"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="", help="comma-separated subset of the case names")
    ap.add_argument("--once", default="", metavar="CASE",
                    help="for a profiler: call CASE twice (a warm-up, then the one to profile: ncu --launch-skip 1) "
                         "and exit")
    args = ap.parse_args()
    if args.once:
        args.cases, args.rounds = args.once, 0
        if args.once not in [c[0] for c in CASES]:
            raise SystemExit(f"--once: expected one of {[c[0] for c in CASES]}, got {args.once!r}")
    import taca_ctypes
    from triton.testing import do_bench

    if taca_ctypes.load() is None:
        raise SystemExit("the ctypes harness did not load (TACA_CUDA_LIB)")
    want = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    torch.manual_seed(0)
    calls = {}
    for name, B, H, D, N, L, tf, var, _, _ in want:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)
        lse = torch.empty(B, H, N, device="cuda")
        tm = torch.empty(B, H, N, device="cuda")
        g = torch.full((B,), 1.2, device="cuda")  # on the device already: no copy per call

        def call(q=q, k=k, v=v, out=out, lse=lse, tm=tm, g=g, L=L, tf=tf, var=var):
            st = taca_ctypes.fwd_status(q, k, v, out, lse, tm, text_len=L, text_first=tf, gamma=g, variant=var)
            if st != 0:
                raise RuntimeError(f"status {st}")

        call()
        torch.cuda.synchronize()
        calls[name] = call
    if args.once:
        calls[args.once]()
        torch.cuda.synchronize()
        return
    times = {c[0]: [] for c in want}
    for r in range(args.rounds):
        for c in (want if r % 2 == 0 else want[::-1]):
            times[c[0]].append(do_bench(calls[c[0]], warmup=10, rep=100, return_mode="median"))
    rows = []
    for name, B, H, D, N, L, tf, var, vs, what in want:
        rows.append(dict(case=name, B=B, H=H, D=D, N=N, text_len=L, text_first=tf, variant=var, vs=vs, tiles=what,
                         ms=statistics.median(times[name]), rounds=times[name]))
    print("| case | N | text | variant | key tiles | ms (median of rounds) | against | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ms = {r["case"]: r["ms"] for r in rows}
    for r in rows:
        b = r["vs"]
        rel = f"{ms[r['case']] / ms[b]:.4f}" if b in ms else "-"
        print(f"| {r['case']} | {r['N']} | {r['text_len']} {'first' if r['text_first'] else 'last'} | "
              f"{r['variant']} | {r['tiles']} | {r['ms']:.4f} | {b or '-'} | {rel} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M")
        with open(os.path.join(args.out, f"mixed_tiles_{stamp}.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
