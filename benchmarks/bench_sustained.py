"""Sustained load: taca's kernels against plain cuDNN SDPA run back to back for several seconds each, with the
GPU's SM clock, power draw and throttle reasons sampled by `nvidia-smi -lms` beside them. The question: are
taca's D = 128 ratios to cuDNN under sustained load (bench_attention_gpu.py: FLUX 2048 fwd+bwd 0.93x) worse
than Nsight Compute's isolated per-kernel durations (main kernels 0.96x, results/long_profile_H100_20261205/),
because the GPU runs taca's kernels at a lower clock (power)?

Phases (bhnd, bf16, gamma 1.2; shapes by bench_attention_gpu.py's names), each --seconds long, in --rounds rotated
orders: taca fwd, cuDNN fwd, taca fwd+bwd (autograd), cuDNN fwd+bwd; with --nseg N,..: taca fwd+bwd with
TACA_BWD_NSEG=N ("taca f+b nsegN"); with --extra: taca fwd with TACA_FWD_SPLIT=0 ("taca fwd split0"), taca
fwd+bwd with deterministic=False ("taca f+b nondet"); with --env NAME=VALUE,..: taca fwd and fwd+bwd with that
variable set ("taca fwd NAME=VALUE", e.g. TACA_FWD_OVERLAP=0). Per phase: ms per iteration (CUDA events over the whole phase),
mean SM MHz, mean W, energy per iteration (ms x W), the share of samples with the software power cap active
(throttle reason 0x4).
Usage: python benchmarks/bench_sustained.py [--shapes flux1024_b1,flux2048_b1] [--seconds 4] [--rounds 2] [--extra] [--env NAME=VALUE,..]
       [--out DIR]"""
import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import taca  # noqa: E402
from bench_attention_gpu import EXTRA_SHAPES, SHAPES  # noqa: E402

FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def with_env(step, name, value):
    """step with the environment variable name set to value for its duration (the previous value restored)."""
    def run():
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            step()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
    return run


def phases(shape, extra, nseg=(), envs=()):
    B, H, D, L, n_img, tf = shape
    N = L + n_img
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    gamma = torch.full((B,), 1.2, device="cuda")

    def taca_f(det=True):
        return taca.joint_attention(q, k, v, text_len=L, text_first=tf, gamma=gamma, layout="bhnd", backend="cuda",
                                    deterministic=det)

    def cudnn_f():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    def fb(f):
        def step():
            q.grad = k.grad = v.grad = None
            f().backward(do)
        return step

    def fwd(f):
        def step():
            with torch.no_grad():
                f()
        return step
    out = {"taca fwd": fwd(taca_f), "cudnn fwd": fwd(cudnn_f), "taca f+b": fb(taca_f), "cudnn f+b": fb(cudnn_f)}
    if extra:
        out["taca fwd split0"] = with_env(fwd(taca_f), "TACA_FWD_SPLIT", "0")
        out["taca f+b nondet"] = fb(lambda: taca_f(det=False))
    for n in nseg:
        out[f"taca f+b nseg{n}"] = with_env(fb(taca_f), "TACA_BWD_NSEG", str(n))
    for e in envs:  # NAME=VALUE: taca fwd and f+b with that variable set
        name, value = e.split("=", 1)
        out[f"taca fwd {e}"] = with_env(fwd(taca_f), name, value)
        out[f"taca f+b {e}"] = with_env(fb(taca_f), name, value)
    return out


def run_phase(step, seconds):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = dt.datetime.now()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            step()
        n += 4
        if n % 32 == 0:  # (keeps the host at most 32 iterations ahead)
            torch.cuda.synchronize()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n, t0, dt.datetime.now()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux1024_b1,flux2048_b1")
    ap.add_argument("--extra", action="store_true")
    ap.add_argument("--nseg", default="", help="also taca f+b with TACA_BWD_NSEG set to each (comma-separated)")
    ap.add_argument("--env", default="", help="also taca fwd / f+b with NAME=VALUE set, for each (comma-separated)")
    ap.add_argument("--only", default="", help="comma-separated phase names to keep (default: all)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bad = [e for e in a.env.split(",") if e and "=" not in e]
    if bad:
        ap.error(f"--env: expected NAME=VALUE entries, got {bad}")
    log = "/tmp/smi_sustained.csv"
    smi_out = open(log, "w")
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=smi_out, stderr=subprocess.DEVNULL)
    res = []
    try:
        for N in a.shapes.split(","):
            ph = phases(SHAPES[N] if N in SHAPES else EXTRA_SHAPES[N], a.extra,
                        [int(x) for x in a.nseg.split(",") if x], [e for e in a.env.split(",") if e])
            if a.only:
                ph = {k: v for k, v in ph.items() if k in a.only.split(",")}
            names = list(ph)
            for r in range(a.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    ms, t0, t1 = run_phase(ph[name], a.seconds)
                    res.append({"shape": N, "round": r, "phase": name, "ms": ms, "t0": t0, "t1": t1})
                    print(f"{N} round {r} {name}: {ms:.3f} ms", flush=True)
            del ph
            torch.cuda.empty_cache()
    finally:
        time.sleep(0.2)
        smi.terminate()
        smi.wait()
        smi_out.close()
    samples = []
    with open(log) as f:
        lines = f.read().splitlines()
    for line in lines:
        p = [s.strip() for s in line.split(",")]
        try:
            samples.append((dt.datetime.strptime(p[0], "%Y/%m/%d %H:%M:%S.%f"), float(p[1]), float(p[2]),
                            float(p[3]), int(p[4], 16)))
        except (ValueError, IndexError):
            continue
    # throttle bits: 0x4 SW power cap, 0x20 SW thermal, 0x40 HW thermal, 0x80 HW power brake, 0x8 HW slowdown
    for r in res:
        # skip the phase's first 0.5 s (clock settling after the previous phase)
        s = [x for x in samples if r["t0"] + dt.timedelta(seconds=0.5) <= x[0] <= r["t1"]]
        r["samples"] = len(s)
        r["sm_mhz"] = sum(x[1] for x in s) / len(s) if s else float("nan")
        r["watts"] = sum(x[2] for x in s) / len(s) if s else float("nan")
        r["temp_c"] = max((x[3] for x in s), default=float("nan"))
        r["power_capped"] = sum(1 for x in s if x[4] & 0x4) / len(s) if s else float("nan")
        r["t0"], r["t1"] = r["t0"].isoformat(), r["t1"].isoformat()
    dev = torch.cuda.get_device_name()
    print(f"\nGPU {dev}, torch {torch.__version__}; {a.seconds} s per phase, {a.rounds} rotated rounds, "
          "means over the rounds (clock / power from nvidia-smi every 50 ms, a phase's first 0.5 s skipped)")
    print("| shape | phase | ms | SM MHz | W | mJ per iteration | max C | power-capped samples | taca / cuDNN ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    names = list(dict.fromkeys(r["phase"] for r in res))
    for N in dict.fromkeys(r["shape"] for r in res):
        for name in names:
            rr = [r for r in res if r["shape"] == N and r["phase"] == name]
            if not rr:
                continue
            m = {k: sum(r[k] for r in rr) / len(rr) for k in ("ms", "sm_mhz", "watts", "power_capped")}
            m["temp_c"] = max(r["temp_c"] for r in rr)
            summary[f"{N} {name}"] = m
        for name in names:
            m = summary.get(f"{N} {name}")
            if m is None:
                continue
            other = summary.get(f"{N} cudnn {name.split()[1]}")
            ratio = f"{m['ms'] / other['ms']:.3f}" if name.startswith("taca") and other else ""
            print(f"| {N} | {name} | {m['ms']:.3f} | {m['sm_mhz']:.0f} | {m['watts']:.0f} | {m['ms'] * m['watts']:.0f} | "
                  f"{m['temp_c']:.0f} | {m['power_capped']:.2f} | {ratio} |")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "sustained.json"), "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "seconds": a.seconds, "rounds": a.rounds,
                       "phases": res, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
