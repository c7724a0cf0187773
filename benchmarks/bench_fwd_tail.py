"""What the last, partial wave costs: FLUX 1024's attention shape at head counts that fill the GPU evenly or not.

Question (issue 13): the D = 128 forward is 3-8% behind cuDNN at FLUX 1024 (864 items of 128 query rows on 132 SMs:
6.55 waves in 7) but even at FLUX 2048 (3168 items: 24 whole waves). Is the partial wave that gap? Every head is
the same work, so time per head is flat where the grid fills the SMs evenly; a kernel that pays for the partial
wave in full runs H = 24 at 7 / 6 of H = 22's time (792 items, 6 whole waves), one that balances it at 24 / 22.
Both methods at each head count, same process, rounds interleaved: taca's public op (gamma 1.2, text first) and
plain cuDNN SDPA (no gamma), forward and forward + backward (the backward's items are key tiles: the same 36 per
head at 4608 keys).

--split 0,auto,3,auto@two also times taca with TACA_FWD_SPLIT set to each value (the tail split: the partial wave's
items as key ranges over every SM, by default in the range form where a model expects a gain; 0: off; "@two":
TACA_FWD_SPLIT_FORM=two, the whole items by the default kernel and the ranges by a second launch), same process, same
rounds ("split<v>_fwd" / "_fb" in the JSON; the table shows the first). Every method runs through the same
environment-setting wrapper (its host cost would otherwise bias the ratios by 2-4%). --calls K times K calls back to
back per sample (the time per call reported): do_bench starts its event right after its L2 flush, so host time
before a single call's launch lands in the sample; with K queued calls it is hidden behind the GPU's work but the
first's (identical kernels read 1-3% apart through the wrapper with K = 1 in the twenty-seventh session's calls).
--env NAME=VALUE,.. also times taca with each variable set (e.g. TACA_FWD_OVERLAP=0 with --feature spans), through
the same wrapper ("env<i>_fwd" / "_fb" in the JSON, a line per variable under the table).

Usage: python3 benchmarks/bench_fwd_tail.py [--heads 22,24,33,44,48] [--tokens 4608] [--rounds 3] [--split auto]
       [--feature none|spans|keymask|keypad] [--env NAME=VALUE,..] [--calls 1] [--out DIR]
Prints a table last; writes fwd_tail.json to DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", default="22,24,33,44,48")
    ap.add_argument("--tokens", type=int, default=4608, help="sequence length (text 512 first)")
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--split", default="", help="TACA_FWD_SPLIT values to time taca with too (comma-separated)")
    ap.add_argument("--feature", default="none", choices=("none", "spans", "keymask", "keypad"),
                    help="taca's call through the forward's feature instances: spans (text_len a (1,) tensor), "
                         "keymask (an all-True (1, 1, 1, N) bool key mask), keypad (one hiding the text past L / 3)")
    ap.add_argument("--env", default="", help="NAME=VALUE,..: also time taca with each variable set (methods env<i>)")
    ap.add_argument("--calls", type=int, default=1, help="calls back to back per timed sample (time per call)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    heads = [int(h) for h in args.heads.split(",") if h]
    if not heads or min(heads) < 1:
        ap.error(f"--heads: expected positive integers, got {args.heads!r}")
    envs = [e for e in args.env.split(",") if e]
    if any("=" not in e for e in envs):
        ap.error(f"--env: expected NAME=VALUE entries, got {args.env!r}")
    if args.calls < 1:
        ap.error(f"--calls: expected a positive integer, got {args.calls}")
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import taca
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    N, D, L = args.tokens, args.dim, args.text
    qtile = 128  # the D = 128 forward's query tile (and the backward's key tile)
    gamma = torch.full((1,), 1.2, device="cuda")
    splits = [x for x in args.split.split(",") if x]
    names = (["taca_fwd", "cudnn_fwd", "taca_fb", "cudnn_fb"] + [f"split{x}_{m}" for x in splits for m in ("fwd", "fb")]
             + [f"env{i}_{m}" for i in range(len(envs)) for m in ("fwd", "fb")])
    res = {h: {nm: [] for nm in names} for h in heads}

    def fns(h):
        g = torch.Generator(device="cuda").manual_seed(h)
        q, k, v = (torch.randn(1, h, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        do = torch.randn_like(q)

        fkw = {}
        if args.feature == "spans":
            fkw["text_len"] = torch.tensor([L], device="cuda")
        elif args.feature in ("keymask", "keypad"):
            m = torch.ones(1, 1, 1, N, dtype=torch.bool, device="cuda")
            if args.feature == "keypad":
                m[..., L // 3:L] = False
            fkw["attn_mask"] = m

        def taca_f(q=q, k=k, v=v):
            return taca.joint_attention(q, k, v, **{"text_len": L, **fkw}, text_first=True, gamma=gamma,
                                        layout="bhnd", backend="cuda")

        def cudnn_f(q=q, k=k, v=v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

        def fb(f):
            def run():
                o = f(qg, kg, vg)
                torch.autograd.backward(o, do)
                qg.grad = kg.grad = vg.grad = None
            return run
        def with_split(fn, val, env=""):
            parts, _, form = val.partition("@")
            # env "NAME=VALUE" (--env); otherwise a variable nothing reads, so every method sets and unsets three
            ename, _, evalue = (env or "TACA_BENCH_UNUSED=1").partition("=")

            def run():
                os.environ["TACA_FWD_SPLIT"] = parts
                os.environ["TACA_FWD_SPLIT_FORM"] = form or "one"
                os.environ[ename] = evalue
                try:
                    return fn()
                finally:
                    os.environ.pop("TACA_FWD_SPLIT", None)
                    os.environ.pop("TACA_FWD_SPLIT_FORM", None)
                    os.environ.pop(ename, None)
            return run
        # every method through the same wrapper (taca's default and cuDNN with TACA_FWD_SPLIT set to "", which is
        # unset's meaning): its two putenv / unsetenv pairs cost host time that do_bench partly measures (it records
        # the start event right after its L2 flush), 2-4% at these shapes on an H100 (KERNEL_LOG twenty-sixth session)
        out = {"taca_fwd": with_split(taca_f, ""), "cudnn_fwd": with_split(cudnn_f, ""),
               "taca_fb": with_split(fb(taca_f), ""), "cudnn_fb": with_split(fb(cudnn_f), "")}
        for x in splits:
            out[f"split{x}_fwd"] = with_split(taca_f, x)
            out[f"split{x}_fb"] = with_split(fb(taca_f), x)
        for i, e in enumerate(envs):
            out[f"env{i}_fwd"] = with_split(taca_f, "", e)
            out[f"env{i}_fb"] = with_split(fb(taca_f), "", e)
        return out

    t0 = time.time()
    for r in range(args.rounds):
        for h in heads:
            f = fns(h)
            order = [nm for nm in f if not (args.no_bwd and nm.endswith("fb"))]
            order = order[r % len(order):] + order[:r % len(order)]  # rotated each round: no method keeps a position
            for name in order:
                fn = f[name]
                if args.calls > 1:
                    fn = (lambda g: lambda: [g() for _ in range(args.calls)])(fn)
                res[h][name].append(do_bench(fn, warmup=10, rep=60, return_mode="median") / args.calls)
            del f
            torch.cuda.empty_cache()
        print(f"round {r + 1}/{args.rounds} done ({time.time() - t0:.0f} s)", flush=True)

    def med(x):
        x = sorted(x)
        return x[len(x) // 2] if x else float("nan")

    base = heads[0]
    out = {"gpu": torch.cuda.get_device_name(0), "sms": sms, "tokens": N, "dim": D, "text": L, "feature": args.feature,
           "calls": args.calls, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds,
           "heads": {}}
    sp = f"split{splits[0]}" if splits else None
    lines = [f"GPU {out['gpu']} ({sms} SMs), N = {N}, D = {D}, batch 1, feature {args.feature}; ms medians of {args.rounds} rounds; "
             f"'per head' is relative to H = {base}'s time per head"
             + (f"; split = TACA_FWD_SPLIT={splits[0]}, vs = its time over the unsplit taca's" if sp else ""),
             "| heads | items | waves | taca fwd | per head | cuDNN fwd | per head | fwd ratio | taca f+b | per head | "
             "cuDNN f+b | per head | f+b ratio |" + (" split |" if sp else ""), "|" + "---|" * (14 if sp else 13)]
    for h in heads:
        items = ((N + qtile - 1) // qtile) * h
        row = {k: med(v) for k, v in res[h].items()}
        out["heads"][h] = {"items": items, "waves": items / sms, **row, "raw": res[h]}
        rel = {k: (row[k] / h) / (med(res[base][k]) / base) for k in row}
        lines.append(
            f"| {h} | {items} | {items / sms:.2f} | {row['taca_fwd']:.4f} | {rel['taca_fwd']:.3f} | "
            f"{row['cudnn_fwd']:.4f} | {rel['cudnn_fwd']:.3f} | {row['cudnn_fwd'] / row['taca_fwd']:.3f} | "
            f"{row['taca_fb']:.4f} | {rel['taca_fb']:.3f} | {row['cudnn_fb']:.4f} | {rel['cudnn_fb']:.3f} | "
            f"{row['cudnn_fb'] / row['taca_fb']:.3f} |"
            + (f" split fwd {row[sp + '_fwd']:.4f} (vs {row[sp + '_fwd'] / row['taca_fwd']:.3f}, cuDNN ratio "
               f"{row['cudnn_fwd'] / row[sp + '_fwd']:.3f}) f+b {row[sp + '_fb']:.4f} "
               f"(vs {row[sp + '_fb'] / row['taca_fb']:.3f}) |" if sp else ""))
    for i, e in enumerate(envs):  # --env methods: forward / fwd+bwd time over the default taca's, per head count
        lines.append(f"{e}: " + ", ".join(
            f"H {h} fwd {out['heads'][h][f'env{i}_fwd']:.4f} ({out['heads'][h][f'env{i}_fwd'] / out['heads'][h]['taca_fwd']:.3f}) "
            f"f+b {out['heads'][h][f'env{i}_fb']:.4f} ({out['heads'][h][f'env{i}_fb'] / out['heads'][h]['taca_fb']:.3f})"
            for h in heads))
    out["env"] = envs
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fwd_tail.json"), "w") as fh:
            json.dump(out, fh, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
