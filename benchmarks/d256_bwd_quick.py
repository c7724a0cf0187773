"""A short check and timing of the D = 256 wgmma backward against the mma.sync one, for a device call too short for
the tests (gpu_d256_bwd_run.sh is the full form): AuraFlow CFG (2 x 12 heads, 264 + 4096 tokens, bf16, gamma 1.2).
Prints, for TACA_BWD_D256 = wgmma and mma: the max error of dq, dk, dv against the float32 reference's gradients and
split SDPA's (the tolerance rule: at most 2x split SDPA's + 1e-5), whether two runs are bitwise equal, and the
backward's ms (CUDA events, median of `--iters`); plain cuDNN SDPA's fwd+bwd beside. Writes JSON to --out."""
import argparse
import json
import os
import statistics

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="/tmp/out")
    args = ap.parse_args()
    import taca
    from taca import reference

    B, H, L, img, D = 2, 12, 264, 4096, 256
    N = L + img
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    kw = dict(text_len=L, text_first=True, gamma=1.2, layout="bhnd")
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(reference.attention_ref(qf, kf, vf, upcast=torch.float32, **kw)[0], (qf, kf, vf),
                              dout.float())
    del qf, kf, vf
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    spl = torch.autograd.grad(reference.attention_split_sdpa(ql, kl, vl, **kw), (ql, kl, vl), dout)
    res = {"shape": [B, H, N, D], "gpu": torch.cuda.get_device_name()}
    for kern in ("wgmma", "mma"):
        os.environ["TACA_BWD_D256"] = kern
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        out = taca.joint_attention(ql, kl, vl, backend="cuda", **kw)
        g1 = torch.autograd.grad(out, (ql, kl, vl), dout, retain_graph=True)
        g2 = torch.autograd.grad(out, (ql, kl, vl), dout, retain_graph=True)
        r = {}
        for nm, a, b, rf, s in zip(("dq", "dk", "dv"), g1, g2, ref, spl):
            err = (a.float() - rf).abs().max().item()
            base = (s.float() - rf).abs().max().item()
            r[nm] = {"err": err, "sdpa_err": base, "rule_ok": err <= 2 * base + 1e-5, "repeatable": torch.equal(a, b)}
        times = []
        for _ in range(args.iters + 2):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            torch.autograd.grad(out, (ql, kl, vl), dout, retain_graph=True)
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        r["bwd_ms"] = statistics.median(times[2:])
        res[kern] = r
        print(kern, json.dumps(r))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    times = []
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for _ in range(args.iters + 2):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            o = torch.nn.functional.scaled_dot_product_attention(ql, kl, vl)
            torch.autograd.grad(o, (ql, kl, vl), dout)
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
    res["plain_cudnn_fwd_bwd_ms"] = statistics.median(times[2:])
    fl = 4 * B * H * N * N * D * 2.5  # backward: 5 of the forward's 2 GEMMs' FLOPs (2 x 2 N^2 D each)
    for kern in ("wgmma", "mma"):
        res[kern]["bwd_tflops"] = fl / res[kern]["bwd_ms"] / 1e9
    print("plain cuDNN fwd+bwd ms", res["plain_cudnn_fwd_bwd_ms"])
    print("bwd ms: wgmma %.3f (%.0f TFLOP/s), mma %.3f (%.0f TFLOP/s)" % (
        res["wgmma"]["bwd_ms"], res["wgmma"]["bwd_tflops"], res["mma"]["bwd_ms"], res["mma"]["bwd_tflops"]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "d256_bwd_quick.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
