"""Where the v6 backward's time goes, per CTA, from a diagnostic build's trace.

Question: the deterministic dQ chains cost FLUX 1024 b1's backward main kernel ~95 us over
deterministic=False (1299 vs 1204 us, KERNEL_LOG eleventh session). Is that the chains' order (a
link waits for its predecessor: the wait would grow with the link's position in the chain), their
four fp32 buffers (memory traffic: TACA_BWD_MODE=atomicseg adds without order into those same
buffers), or a per-tile cost of the ordered writer? The trace build (TACA_NVCC_EXTRA=-DTACA_BWD_TRACE=1
at `setup.py build_ext`; csrc/cuda/taca_bwd_sm90_v6.cu documents the slots) records per CTA its SM,
start and end (globaltimer), MMA thread 0's cycles waiting for a query tile, for dS' and for a free
dQ staging buffer, and each writer warp's cycles polling its predecessor, waiting for a staged tile
and for its writes. The instrumentation itself costs time: compare modes within one build only.

The D = 256 wgmma backward (`--kernel d256`) has its trace in every sm_90a build instead, as a runtime instance
(TACA_BWD_D256_TRACE=1, set here; csrc/cuda/taca_bwd_sm90_d256.cu documents its slots): per CTA its SM, start,
loop start and end, MMA thread 0's cycles in each of the tile loop's 15 segments (every cycle of the loop in one:
waits for Q, dO, the wgmma products, the P^T / dS' buffers, the warpgroups' barrier, the staging buffers, and the
work between them), the writers' cycles polling / waiting for a slice / issuing it / releasing, the producer's
waits for free buffers. Its table gives cycles per query tile, so where a tile's time goes.

Usage: python3 benchmarks/bwd_trace.py [--kernel v6|d256] [--shapes flux1024_b1] [--modes det,nd,as,racy] [--reps 3]
       [--out DIR]
Modes: "det" (the default, deterministic chains), "nd" (deterministic=False: unordered adds into one
buffer), "as" (unordered adds into the chains' buffers, TACA_BWD_MODE=atomicseg; v6 only), "racy" (every key
tile stores its part, no adds, no order: a wrong dq on purpose, the bound without any dQ reduction), "skip"
(d256 only: no dQ written at all, TACA_BWD_MODE=skipdq; wrong dq); "<mode>+oh" (d256 only: the own-half variant,
TACA_BWD_D256_OWN=1);
"<mode>@sN": N chains (TACA_BWD_NSEG); "<mode>+tw" / "<mode>+rows": v6's tensor / row dQ writer
(TACA_BWD_V6_WRITER; v6 only). Prints tables last; writes bwd_trace.json (summaries) and
bwd_trace_raw.safetensors (the raw per-CTA slots of the last repetition, and the first mode's per-tile
times) to DIR.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import taca._C as _C  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention_gpu import EXTRA_SHAPES, SHAPES as _BASE_SHAPES  # noqa: E402

SHAPES = {**_BASE_SHAPES, **EXTRA_SHAPES}
from bench_bwd_handoff import bwd_case  # noqa: E402

SLOTS, MAX_CTAS = 16, 16384  # kTraceSlots, kTraceCtas of taca_bwd_sm90_v6.cu
TILE_CTAS, TILES = 4096, 64  # kTraceTileCtas, kTraceTiles

# the D = 256 kernel's trace instance (taca_bwd_sm90_d256.cu): kTraceSlots, kTraceCtas, its TSeg segments in order,
# the first slot of the segments, of the writers (5 each), of the producer (2), and the loop start's slot
SLOTS256, MAX_CTAS256 = 40, 4096
SEGS256 = ("q_wait", "s_issue", "do_wait", "dp_issue_s_wait", "exp", "pds_wait", "pt_store_dp_wait", "ds_store",
           "mma_barrier", "dv_dq0_dk", "stage0_wait", "stage0", "dq1_dk_wait", "stage1_wait", "stage1")
TR_SEG = 6
TR_WRITER = TR_SEG + len(SEGS256)
TR_PRODUCER = TR_WRITER + 10
TR_LOOP_START = TR_PRODUCER + 2


def trace_lib(kernel: str = "v6"):
    lib = ctypes.CDLL(_C.__file__)
    if kernel == "d256":
        try:
            lib.taca_bwd256_trace_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.taca_bwd256_trace_reset.argtypes = []
        except AttributeError:
            sys.exit(f"{_C.__file__} has no D = 256 trace (a build without sm_90a)")
        return lib
    try:
        lib.taca_bwd_trace_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.taca_bwd_trace_reset.argtypes = []
        lib.taca_bwd_trace_read_tiles.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except AttributeError:
        sys.exit(f"{_C.__file__} is not a trace build: rebuild with TACA_NVCC_EXTRA=-DTACA_BWD_TRACE=1")
    return lib


def mode_env(mode: str, kernel: str = "v6"):
    """(deterministic, environment) of a mode name for `kernel` ("v6" or "d256")."""
    env, base = {}, mode
    if kernel == "d256":  # the wgmma kernel at D = 136..256, its trace instance
        env.update(TACA_BWD_D256="wgmma", TACA_BWD_D256_TRACE="1")
        if base.endswith("+oh"):  # its own-half dV / dK before the barrier (TACA_BWD_D256_OWN)
            base = base[:-3]
            env["TACA_BWD_D256_OWN"] = "1"
    for suffix, writer in (("+tw", "tensor"), ("+rows", "rows")):  # v6's dQ writer (TACA_BWD_V6_WRITER)
        if base.endswith(suffix) and kernel == "v6":
            base = base[: -len(suffix)]
            env["TACA_BWD_V6_WRITER"] = writer
    if "@s" in base:
        base, n = base.split("@s")
        env["TACA_BWD_NSEG"] = n
    if base == "det":
        return True, env
    if base == "nd":
        return False, env
    if base == "as" and kernel == "v6":
        env["TACA_BWD_MODE"] = "atomicseg"
        return False, env
    if base == "racy":
        env["TACA_BWD_MODE"] = "racy"
        return True, env
    if base == "skip" and kernel == "d256":
        env["TACA_BWD_MODE"] = "skipdq"
        return True, env
    known = "det, nd, as, racy, with an optional @sN, +tw, +rows" if kernel == "v6" else \
        "det, nd, racy, skip, with an optional @sN, +oh"
    raise SystemExit(f"--modes: unknown mode {mode!r} for --kernel {kernel} ({known})")


def sm_occupancy(sm: np.ndarray, start: np.ndarray, end: np.ndarray) -> dict:
    """Per SM, the gaps between consecutive CTAs and the idle tail after its last one (us; times in ns)."""
    t0 = start.min()
    gaps = tails = 0.0
    ends_per_sm = []
    for s in np.unique(sm):
        idx = np.where(sm == s)[0]
        o = idx[np.argsort(start[idx])]
        gaps += float(np.clip(start[o[1:]] - end[o[:-1]], 0, None).sum()) / 1e3
        tails += float(end.max() - end[o[-1]]) / 1e3
        ends_per_sm.append(float(end[o[-1]] - t0) / 1e3)
    used = len(np.unique(sm))
    return {"sms_used": used, "sm_gap_us_per_sm": gaps / max(used, 1), "sm_tail_idle_us_per_sm": tails / max(used, 1),
            "last_end_per_sm_us": {"min": min(ends_per_sm), "median": float(np.median(ends_per_sm)),
                                   "max": max(ends_per_sm)}}


def summarize(tr: np.ndarray, n_sm: int) -> dict:
    """Per-CTA slots -> times in us (cycles converted at the measured clock)."""
    start, mma_end = tr[:, 1].astype(np.int64), tr[:, 2].astype(np.int64)
    wend = np.maximum(tr[:, 13], tr[:, 14]).astype(np.int64)
    end = np.maximum(mma_end, wend)
    t0 = start.min()
    span = (end.max() - t0) / 1e3
    dur = (end - start) / 1e3
    ghz = float(np.median(tr[:, 15] / np.maximum(mma_end - start, 1)))
    cyc = lambda s: tr[:, s].astype(np.float64) / (ghz * 1e3)  # noqa: E731
    pos = ((tr[:, 3] >> 16) & 0xFF).astype(np.int64)
    seg = ((tr[:, 3] >> 24) & 0xFF).astype(np.int64)
    parts = {"q_wait": cyc(4), "ds_wait": cyc(5), "empty_wait": cyc(6),
             "poll": (cyc(7) + cyc(8)) / 2, "full_wait": (cyc(9) + cyc(10)) / 2,
             "write_wait": (cyc(11) + cyc(12)) / 2, "dur": dur}
    by_pos = {k: [float(v[pos == p].mean()) for p in range(pos.max() + 1)] for k, v in parts.items()}
    occ = sm_occupancy(tr[:, 0].astype(np.int64), start, end)
    return {
        "ctas": int(tr.shape[0]), "span_us": span, "clock_ghz": ghz,
        "cta_mean_us": float(dur.mean()),
        "mean_us": {k: float(v.mean()) for k, v in parts.items()},
        "by_chain_position": by_pos, "chains": int(seg.max() + 1),
        **occ, "sm_idle_unused_sms": n_sm - occ["sms_used"],
    }


def summarize256(tr: np.ndarray, n_sm: int) -> dict:
    """The D = 256 kernel's per-CTA slots -> where a query tile's time goes: MMA thread 0's cycles per tile in each
    segment of the loop (means over CTAs of each CTA's cycles / its tiles), the writers' (mean of the two) and the
    producer's waits per tile, and the CTAs' times in us (globaltimer; cycles per ns from the loop's two clocks)."""
    t = tr.astype(np.int64)
    start, loop0, mma_end = t[:, 1], t[:, TR_LOOP_START], t[:, 2]
    wend = np.maximum(t[:, TR_WRITER + 4], t[:, TR_WRITER + 9])
    end = np.maximum(mma_end, wend)
    tiles = np.maximum(t[:, 5], 1).astype(np.float64)
    ghz = float(np.median(t[:, 4] / np.maximum(mma_end - loop0, 1)))
    per_tile = lambda x: float((x / tiles).mean())  # noqa: E731
    segs = {name: per_tile(t[:, TR_SEG + i]) for i, name in enumerate(SEGS256)}
    writer = {name: per_tile((t[:, TR_WRITER + i] + t[:, TR_WRITER + 5 + i]) / 2.0)
              for i, name in enumerate(("poll", "full_wait", "issue_read", "release"))}
    occ = sm_occupancy(t[:, 0], start, end)
    loop = per_tile(t[:, 4])
    return {
        "ctas": int(t.shape[0]), "span_us": float(end.max() - start.min()) / 1e3, "clock_ghz": ghz,
        "cta_mean_us": float((end - start).mean()) / 1e3, "setup_us": float((loop0 - start).mean()) / 1e3,
        "tail_us": float((end - mma_end).mean()) / 1e3, "tiles_per_cta": float(tiles.mean()),
        "loop_cycles_per_tile": loop, "segments_cycles_per_tile": segs,
        "segments_share": {k: v / loop if loop else 0.0 for k, v in segs.items()},
        "writer_cycles_per_tile": writer,
        "producer_cycles_per_tile": {"q_empty_wait": per_tile(t[:, TR_PRODUCER]),
                                     "do_empty_wait": per_tile(t[:, TR_PRODUCER + 1])},
        **occ, "sm_idle_unused_sms": n_sm - occ["sms_used"],
    }


def summarize_tiles(tr: np.ndarray, tt: np.ndarray, nqt: int) -> dict:
    """Per-tile times (tt: CTAs x TILES x 4 ns: staged, predecessor's release seen, staged seen by the
    writer, released) of the CTAs whose predecessor in the chain is the previous CTA (chain position
    > 0): how long a link's release trails its predecessor's, and where that time goes. us."""
    n = min(tt.shape[0], tr.shape[0])
    tiles = min(nqt, TILES)
    pos = ((tr[:n, 3] >> 16) & 0xFF).astype(np.int64)
    S, P, F, R = (tt[:n, :tiles, i].astype(np.float64) for i in range(4))
    out = {}
    has_pred = np.where((pos > 0) & (P[:, 0] > 0))[0]
    if len(has_pred):
        k, pk = has_pred, has_pred - 1
        lag = (R[k] - R[pk]) / 1e3                     # link's release after the predecessor's
        observe = (P[k] - R[pk]) / 1e3                 # predecessor's release -> seen by the poll
        early = (R[pk] - S[k]) / 1e3                   # > 0: staged before the predecessor released
        transfer = (R[k] - np.maximum(P[k], F[k])) / 1e3  # seen and staged -> own release
        mid = slice(tiles // 4, 3 * tiles // 4)        # steady state: the middle half of the tiles
        med = lambda x: float(np.median(x))  # noqa: E731
        out = {
            "links": int(len(k)),
            "lag_us": {"median": med(lag), "mean": float(lag.mean()), "mid_median": med(lag[:, mid])},
            "observe_us": {"median": med(observe), "mid_median": med(observe[:, mid])},
            "staged_before_pred_release_us": {"median": med(early), "mid_median": med(early[:, mid])},
            "transfer_us": {"median": med(transfer), "mid_median": med(transfer[:, mid])},
            "lag_by_tile_us": [float(np.median(lag[:, i])) for i in range(tiles)],
            "staged_to_release_by_position_us": [
                float(np.median((R[pos == p] - S[pos == p]) / 1e3)) for p in range(pos.max() + 1)],
        }
    head = np.where(pos == 0)[0]
    if len(head):
        out["head_transfer_us"] = float(np.median((R[head] - F[head]) / 1e3))
        out["head_staged_to_release_us"] = float(np.median((R[head] - S[head]) / 1e3))
    return out


def print_d256(res: dict, reps: int) -> None:
    """The D = 256 trace's tables: a query tile's cycles by segment (MMA thread 0), the writers' and the producer's."""
    print(f"GPU {res['gpu']}, torch {res['torch']}; D = 256 wgmma backward main kernel, trace instance "
          f"(instrumented: compare modes within it); median-span repetition of {reps}")
    print("| shape | mode | span us | CTA mean us | setup us | tail us | GHz | tiles / CTA | loop cycles / tile | "
          "SM gaps us / SM | SM tail idle us / SM | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rs in res["shapes"].items():
        for m, r in rs.items():
            print(f"| {name} | {m} | {r['span_us']:.1f} | {r['cta_mean_us']:.2f} | {r['setup_us']:.2f} | "
                  f"{r['tail_us']:.2f} | {r['clock_ghz']:.3f} | {r['tiles_per_cta']:.1f} | "
                  f"{r['loop_cycles_per_tile']:.0f} | {r['sm_gap_us_per_sm']:.2f} | {r['sm_tail_idle_us_per_sm']:.1f} | "
                  f"{r['max_abs_diff_to_first_mode']:.2g} |")
    print("MMA thread 0, cycles per query tile by segment (share of the loop):")
    print("| shape | mode | " + " | ".join(SEGS256) + " |")
    print("|---|---|" + "---|" * len(SEGS256))
    for name, rs in res["shapes"].items():
        for m, r in rs.items():
            c, sh = r["segments_cycles_per_tile"], r["segments_share"]
            print(f"| {name} | {m} | " + " | ".join(f"{c[k]:.0f} ({100 * sh[k]:.0f}%)" for k in SEGS256) + " |")
    print("Writers (mean of the two) and producer, cycles per query tile:")
    print("| shape | mode | poll | slice wait (st_full) | issue + read | release | producer q_empty wait | "
          "producer do_empty wait |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in res["shapes"].items():
        for m, r in rs.items():
            w, pr = r["writer_cycles_per_tile"], r["producer_cycles_per_tile"]
            print(f"| {name} | {m} | {w['poll']:.0f} | {w['full_wait']:.0f} | {w['issue_read']:.0f} | "
                  f"{w['release']:.0f} | {pr['q_empty_wait']:.0f} | {pr['do_empty_wait']:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="v6", choices=("v6", "d256"),
                    help="v6 (a TACA_BWD_TRACE build) or the D = 256 wgmma kernel (its trace instance, any sm_90a build)")
    ap.add_argument("--shapes", default=None, help="default flux1024_b1 (v6), auraflow_cfg (d256)")
    ap.add_argument("--modes", default=None, help="default det,nd,as,racy (v6), det,nd,racy,skip (d256)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    d256 = args.kernel == "d256"
    if args.reps < 1:
        raise SystemExit(f"--reps: expected >= 1, got {args.reps}")
    modes = [m for m in (args.modes or ("det,nd,racy,skip" if d256 else "det,nd,as,racy")).split(",") if m]
    for m in modes:
        mode_env(m, args.kernel)  # unknown names fail before any GPU work
    shapes = [s for s in (args.shapes or ("auraflow_cfg" if d256 else "flux1024_b1")).split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {s!r}; expected one of {sorted(SHAPES)}")
        if d256 and not 128 < SHAPES[s][2] <= 256:
            raise SystemExit(f"--shapes: {s!r} has head dim {SHAPES[s][2]}; --kernel d256 takes 136..256")
    lib = trace_lib(args.kernel)
    read, reset = ((lib.taca_bwd256_trace_read, lib.taca_bwd256_trace_reset) if d256
                   else (lib.taca_bwd_trace_read, lib.taca_bwd_trace_reset))
    slots, max_ctas, tile = (SLOTS256, MAX_CTAS256, 64) if d256 else (SLOTS, MAX_CTAS, 128)
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kernel": args.kernel,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shapes": {}}
    raw = {}
    for name in shapes:
        B, H = SHAPES[name][:2]
        bwd_of, N, D = bwd_case(name)
        n_ctas = -(-N // tile) * H * B
        if n_ctas > max_ctas:
            raise SystemExit(f"{name}: {n_ctas} CTAs, the trace holds {max_ctas}")
        buf = np.zeros((n_ctas, slots), dtype=np.uint64)
        tbuf = None if d256 else np.zeros((min(n_ctas, TILE_CTAS), TILES, 4), dtype=np.uint64)
        nqt = -(-N // (64 if D > 64 else 128))
        res["shapes"][name] = {}
        ref = None
        for m in modes:
            det, env = mode_env(m, args.kernel)
            os.environ.update(env)
            try:
                g = bwd_of(det)
                if ref is None:
                    ref = g
                diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(g, ref))
                for _ in range(3):
                    bwd_of(det)
                reps = []
                for _ in range(args.reps):
                    torch.cuda.synchronize()
                    if reset() != 0:
                        raise SystemExit("trace reset failed")
                    bwd_of(det)
                    torch.cuda.synchronize()
                    if read(buf.ctypes.data, buf.nbytes) != 0:
                        raise SystemExit("trace read failed")
                    if not (buf[:, 1] > 0).all():
                        who = "the D = 256 wgmma kernel" if d256 else "v6"
                        raise SystemExit(f"{name} {m}: not every CTA wrote its trace ({who} did not run?)")
                    if d256:
                        reps.append(summarize256(buf, n_sm))
                        continue
                    if lib.taca_bwd_trace_read_tiles(tbuf.ctypes.data, tbuf.nbytes) != 0:
                        raise SystemExit("taca_bwd_trace_read_tiles failed")
                    reps.append(summarize(buf, n_sm))
                    reps[-1]["tiles"] = summarize_tiles(buf, tbuf, nqt)
                raw[f"{name}.{m}"] = torch.from_numpy(buf.astype(np.int64).copy())
                if m == modes[0] and not d256:  # the first mode's tile times: ns after the first CTA's start, int32
                    tt = tbuf[:n_ctas, :nqt].astype(np.int64)
                    tt = np.where(tt > 0, tt - int(buf[:, 1].min()), 0)
                    raw[f"{name}.{m}.tiles_ns_from_first_start"] = torch.from_numpy(tt.astype(np.int32))
            finally:
                for e in env:
                    del os.environ[e]
            # the repetition whose kernel span is the median one (every field from it), and all spans
            mid = sorted(reps, key=lambda r: r["span_us"])[len(reps) // 2]
            mid["span_us_all"] = [r["span_us"] for r in reps]
            mid["max_abs_diff_to_first_mode"] = diff
            res["shapes"][name][m] = mid
        del ref
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bwd_trace.json"), "w") as f:
        json.dump(res, f, indent=1)
    from safetensors.torch import save_file
    save_file(raw, os.path.join(args.out, "bwd_trace_raw.safetensors"))
    if d256:
        print_d256(res, args.reps)
        return 0
    print(f"GPU {res['gpu']}, torch {res['torch']}; v6 backward main kernel, trace build (instrumented: "
          f"compare modes within this build only); us, median-span repetition of {args.reps}")
    print("| shape | mode | span | CTA mean | q wait | dS' wait | staging wait | poll | writer full wait "
          "| write wait | SM gaps / SM | SM tail idle / SM | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rs in res["shapes"].items():
        for m, r in rs.items():
            mu = r["mean_us"]
            print(f"| {name} | {m} | {r['span_us']:.1f} | {r['cta_mean_us']:.2f} | {mu['q_wait']:.2f} | "
                  f"{mu['ds_wait']:.2f} | {mu['empty_wait']:.2f} | {mu['poll']:.2f} | {mu['full_wait']:.2f} | "
                  f"{mu['write_wait']:.2f} | {r['sm_gap_us_per_sm']:.2f} | {r['sm_tail_idle_us_per_sm']:.1f} | "
                  f"{r['max_abs_diff_to_first_mode']:.2g} |")
    print("By chain position (CTA duration / staging wait / poll, us):")
    for name, rs in res["shapes"].items():
        for m, r in rs.items():
            bp = r["by_chain_position"]
            print(f"| {name} | {m} | dur " + " ".join(f"{x:.1f}" for x in bp["dur"]) +
                  " | stage " + " ".join(f"{x:.1f}" for x in bp["empty_wait"]) +
                  " | poll " + " ".join(f"{x:.1f}" for x in bp["poll"]) + " |")
    print("Per tile (medians, us; the middle half of the tiles in brackets): a link's release after its "
          "predecessor's | predecessor's release -> seen | staged before the predecessor's release | "
          "seen and staged -> own release | chain head: staged -> released")
    for name, rs in res["shapes"].items():
        for m, r in rs.items():
            t = r.get("tiles", {})
            if "lag_us" not in t:
                print(f"| {name} | {m} | no chain | head staged -> released {t.get('head_staged_to_release_us', 0):.2f} |")
                continue
            print(f"| {name} | {m} | lag {t['lag_us']['median']:.2f} ({t['lag_us']['mid_median']:.2f}) | "
                  f"observe {t['observe_us']['median']:.2f} ({t['observe_us']['mid_median']:.2f}) | "
                  f"early {t['staged_before_pred_release_us']['median']:.2f} "
                  f"({t['staged_before_pred_release_us']['mid_median']:.2f}) | "
                  f"transfer {t['transfer_us']['median']:.2f} ({t['transfer_us']['mid_median']:.2f}) | "
                  f"head {t.get('head_staged_to_release_us', 0):.2f} |")
            print("    staged -> released by position: " +
                  " ".join(f"{x:.1f}" for x in t["staged_to_release_by_position_us"]) +
                  " | lag by tile: " + " ".join(f"{x:.1f}" for x in t["lag_by_tile_us"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
