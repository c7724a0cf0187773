"""Backward kernel alone, per Hopper kernel (v6, v5) and per dQ hand-off of v5 (TACA_BWD_SM90_HANDOFF).

Question: what does each hand-off between the MMA warpgroups and the dQ writer warpgroup of
csrc/cuda/taca_bwd_sm90.cu cost, against the kernel without a writer ("none" = v4a, commit
bc8237e)? Same process, same inputs, rounds interleaved over the modes (each round starting one mode
later), triton do_bench median;
dq / dk / dv of every mode are compared bitwise with the default's first.

Usage: python3 benchmarks/bench_bwd_handoff.py [--shapes flux1024_b1,sd35m_cfg,flux1024_b2+kmask] [--rounds 3]
       [--modes v5,v5:mbarrier,v5:mbarrier-eager,v5:rendezvous,v5:arrive,v5:none,v6,v6:rows,v6:tensor,v6+nd] [--out DIR]
("+nd": the op's deterministic=False, unordered dQ atomics; not bitwise equal by design;
"v5": the v5 kernel with its default hand-off, "v5:<hand-off>" v5 with another, "v6": the v6
kernel (TACA_BWD_SM90_KERNEL=v6, the default), "v6:rows" / "v6:tensor" v6 with that dQ writer
(TACA_BWD_V6_WRITER), "<mode>@sN" that mode with N deterministic dQ chains (TACA_BWD_NSEG),
"<mode>@o0" that mode with dQ converted after the main kernel (TACA_BWD_DQ_OVERLAP=0), "<mode>@g3" v6's
3-D grid at D = 64 (TACA_BWD_V6_GRID=3d; the 1-D one is the default there), "<mode>@fs" / "<mode>@tm" v6 with
dK / dV by fragment stores / by TMA (TACA_BWD_V6_DKV=frag / tma; TMA is the default), "<mode>@me" a key mask
by the per-element path (TACA_BWD_MASK=elem), "<mode>@k0" without the backward's skew (TACA_BWD_SKEW=0; v6 and mma), "<mode>@p0" v6 reading the span and lse2 / delta where used (TACA_BWD_V6_PF=0), "<mode>@i0" there the tile index divided per tile (TACA_BWD_V6_IX=0), "<mode>@ds" / "<mode>@d0" v6 staging each tile's dQ at the next tile's top or not (TACA_BWD_V6_DS=1 / 0; on at D = 72..128, not at D = 64; =0 turns DF off too), "<mode>@f0" / "<mode>@df" v6 without / with each tile's dQ product issued at the next tile (TACA_BWD_V6_DF=0 / 1: DF is the default at D = 72..128, where =0 gives DS; a switch at D = 64), "<mode>@l0" DF without its lead (TACA_BWD_V6_DFLEAD=0), "<mode>@d2" v6 at D = 64 with DF and two dS' buffers (TACA_BWD_V6_D2=1), "<mode>@rc" every key tile storing its dQ
part without adds or order (TACA_BWD_MODE=racy: a wrong dq on purpose, the bound without a dQ reduction), "<mode>@sk"
no dQ written at all (TACA_BWD_MODE=skipdq: wrong dq; the D = 256 wgmma kernel and v5 take it), "<mode>@oh" the D = 256
wgmma kernel's own-half dV / dK from registers before its barrier (TACA_BWD_D256_OWN=1), "mma" the mma.sync
kernel (TACA_BWD_SM90=0, other GPUs' backward), "d256" / "d256:mma" at D = 136..256 the wgmma kernel / the mma.sync
one (TACA_BWD_D256=wgmma / mma); suffixes combine, e.g. "v6@s4@o0+nd", "d256@k0+nd");
the table also gives each mode's max difference to the first)
Prints a table last; writes JSON to DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from taca import ops, reference  # noqa: E402,F401  (loads taca._C)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention_gpu import EXTRA_SHAPES, SHAPES  # noqa: E402

# "v5" (the default kernel, its default hand-off "bulk"), "v5:<hand-off>" (v5 with TACA_BWD_SM90_HANDOFF;
# a bare hand-off name means the same), "v6" (TACA_BWD_SM90_KERNEL=v6), "v6:rows" / "v6:tensor" (v6
# with that dQ writer, TACA_BWD_V6_WRITER); the first mode is the reference
# of the bitwise comparison
MODES = ["v5", "v5:mbarrier", "v5:mbarrier-eager", "v5:rendezvous", "v5:arrive", "v5:none", "v6"]
ENV = "TACA_BWD_SM90_HANDOFF"


def bwd_case(name: str):
    """Inputs of a backward on shape `name` (bench_attention_gpu.SHAPES; bf16, (B, N, H, D), seed 0,
    gamma 1.2) and a function running it: (bwd(deterministic) -> (dq, dk, dv), N, D). "<shape>+kmask":
    with a (B, 1, 1, N) bool key mask that drops the last two thirds of every other sample's text (a
    padded negative prompt, as Qwen-Image's), so the kernels' masked instances run; "<shape>+kall": such a
    mask with every key attending (the masked instances, every key tile on their unmasked paths)."""
    base, _, extra = name.partition("+")
    if extra not in ("", "kmask", "kall"):
        raise SystemExit(f"--shapes: {name!r}: expected <shape>, <shape>+kmask or <shape>+kall")
    shapes = {**SHAPES, **EXTRA_SHAPES}
    if base not in shapes:
        raise SystemExit(f"--shapes: {base!r}: expected one of {', '.join(shapes)}")
    B, H, D, L, img, text_first = shapes[base]
    N = L + img
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, N, H, D, generator=gen, device="cuda").to(torch.bfloat16)
                     for _ in range(4))
    gamma_t = torch.full((B,), 1.2, device="cuda")
    tb, te = reference.text_range(N, L, text_first)
    scale = D ** -0.5
    mask = None
    if extra:
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
        if extra == "kmask":
            mask[1::2, :, :, tb + L // 3:te] = False
    out, lse, _ = torch.ops.taca.fwd(q, k, v, gamma_t, 1.0, scale, tb, te, False, attn_mask=mask)

    def bwd(det=True):
        return torch.ops.taca.bwd(dout, q, k, v, out, lse, gamma_t, 1.0, scale, tb, te, -1, -1, None, mask, det)

    return bwd, N, D


def main() -> int:
    import triton.testing

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux1024_b1,sd35m_cfg")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--modes", default=",".join(MODES), help="subset, default first")
    args = ap.parse_args()
    MODES[:] = [m for m in args.modes.replace(" ", ",").split(",") if m]
    dev = torch.cuda.get_device_name()
    res = {"gpu": dev, "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shapes": {}}
    for name in args.shapes.split(","):
        bwd, _, _ = bwd_case(name)
        # Only the first mode's gradients are kept (the others are compared at once and freed), so that
        # every mode is timed with the same tensors alive: identical kernels held 1.5-2% apart when each
        # mode kept its own (bench_bwd_H200_20261204_positions/)
        ref, equal, maxdiff, times = None, {}, {}, {m: [] for m in MODES}
        for r in range(args.rounds):
            # each round starts one mode later, so that no mode keeps one position in the rounds (a drift
            # over a round would otherwise fall on the same modes every time)
            for m in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
                # "<hand-off>+nd": that hand-off with deterministic=False (unordered dQ atomics)
                base = m[:-3] if m.endswith("+nd") else m
                # "<mode>@sN": that mode with N dQ chains (TACA_BWD_NSEG, a timing switch)
                nseg = None
                env = {}
                # "<mode>@o0": dQ converted after the kernel (TACA_BWD_DQ_OVERLAP=0); "<mode>@g3":
                # v6's 3-D grid at D = 64 (TACA_BWD_V6_GRID=3d); either order, after any "@sN"
                # (also "@o2": converted after, the main kernel's per-tile releases kept; "@cN": N
                # conversion CTAs per SM, TACA_BWD_CONV_CTAS; "@fs" / "@tm": v6's dK / dV by fragment
                # stores / by TMA, TACA_BWD_V6_DKV=frag / tma; "@me": a key mask by the per-element
                # path, TACA_BWD_MASK=elem; "@k0": without the skew, TACA_BWD_SKEW=0; "@p0": v6 without the
                # reads ahead, TACA_BWD_V6_PF=0)
                suffixes = (("@o0", "TACA_BWD_DQ_OVERLAP", "0"), ("@o2", "TACA_BWD_DQ_OVERLAP", "2"),
                            ("@g3", "TACA_BWD_V6_GRID", "3d"), ("@fs", "TACA_BWD_V6_DKV", "frag"),
                            ("@tm", "TACA_BWD_V6_DKV", "tma"), ("@me", "TACA_BWD_MASK", "elem"),
                            ("@k0", "TACA_BWD_SKEW", "0"), ("@p0", "TACA_BWD_V6_PF", "0"),
                            ("@i0", "TACA_BWD_V6_IX", "0"), ("@ds", "TACA_BWD_V6_DS", "1"),
                            ("@d0", "TACA_BWD_V6_DS", "0"), ("@f0", "TACA_BWD_V6_DF", "0"), ("@df", "TACA_BWD_V6_DF", "1"),
                            ("@l0", "TACA_BWD_V6_DFLEAD", "0"), ("@d2", "TACA_BWD_V6_D2", "1"),
                            ("@rc", "TACA_BWD_MODE", "racy"), ("@sk", "TACA_BWD_MODE", "skipdq"),
                            ("@oh", "TACA_BWD_D256_OWN", "1")) + tuple(
                                (f"@c{n}", "TACA_BWD_CONV_CTAS", str(n)) for n in range(1, 9))
                for suffix, var, val in suffixes * 3:
                    if base.endswith(suffix):
                        base = base[:-3]
                        env[var] = val
                if "@s" in base:
                    base, nseg = base.split("@s")
                is6 = base == "v6" or base.startswith("v6:")
                if base == "mma":  # the mma.sync kernel (TACA_BWD_SM90=0): what other GPUs run
                    env["TACA_BWD_SM90"] = "0"
                elif base in ("d256", "d256:mma"):  # D = 136..256: the wgmma kernel or the mma.sync one
                    env["TACA_BWD_D256"] = "wgmma" if base == "d256" else "mma"
                else:
                    env["TACA_BWD_SM90_KERNEL"] = "v6" if is6 else "v5"
                    if is6 and base != "v6":  # "v6:rows" / "v6:tensor": v6 with that dQ writer
                        env["TACA_BWD_V6_WRITER"] = base[3:]
                    elif base not in ("v6", "v5"):  # "v5:<hand-off>" or a bare v5 hand-off name
                        env[ENV] = base[3:] if base.startswith("v5:") else base
                if nseg is not None:
                    env["TACA_BWD_NSEG"] = nseg
                det = not m.endswith("+nd")
                os.environ.update(env)
                try:
                    if r == 0:  # (round 0 starts with MODES[0]: ref is set first)
                        g = bwd(det)
                        if ref is None:
                            ref = g
                        equal[m] = all(torch.equal(a, b) for a, b in zip(g, ref))
                        maxdiff[m] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(g, ref))
                        del g
                    times[m].append(triton.testing.do_bench(lambda: bwd(det), warmup=100, rep=500,
                                                            return_mode="median"))
                finally:
                    for e in env:
                        del os.environ[e]
        torch.cuda.synchronize()
        res["shapes"][name] = {"ms": {m: statistics.median(t) for m, t in times.items()},
                               "all_ms": times, "bitwise_equal_to_default": equal,
                               "max_abs_diff_to_default": maxdiff}
        del ref
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_bwd_handoff.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"GPU {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16, gamma 1.2; "
          f"bwd alone, median of {args.rounds} interleaved rounds")
    print("| shape | " + " | ".join(MODES) + " | bitwise = default | max abs diff to default |")
    print("|---|" + "---|" * (len(MODES) + 2))
    for name, r in res["shapes"].items():
        eq = ",".join(m for m in MODES if r["bitwise_equal_to_default"][m])
        md = ",".join(f"{m}:{r['max_abs_diff_to_default'][m]:.2g}" for m in MODES[1:])
        print(f"| {name} | " + " | ".join(f"{r['ms'][m]:.3f}" for m in MODES) + f" | {eq} | {md} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
