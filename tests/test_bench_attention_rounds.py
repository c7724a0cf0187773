"""benchmarks/bench_attention_gpu.py's interleaved rounds (--rounds), on the CPU with a stand-in for the timer: every
timed method but the slow alternatives gets `rounds` timings of its forward and its fwd+bwd, the methods rotated
each round, and each cell becomes the median of its rounds; a bad --rounds is refused before any work (the table
itself needs a GPU)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_attention_gpu as bag  # noqa: E402


def test_more_rounds_medians_and_rotation(monkeypatch):
    current, calls = [None], []
    # each method's timings in the order of its calls: its forward, then its fwd+bwd, per round
    script = {"taca_cuda": iter([2.0, 20.0, 3.0, 30.0]), "plain_cudnn": iter([5.0, 50.0, 7.0, 70.0])}
    grads = []

    def fake_bench(fn, quick):
        fn()  # runs the closure: a forward, or a forward and its gradient
        calls.append(current[0])
        return next(script[current[0]])

    monkeypatch.setattr(bag, "_bench", fake_bench)

    def fn(q, k, v):
        if q.requires_grad:
            grads.append(True)
        return q * k + v

    class Tracking(dict):  # the method being timed: looked up right before its two timings
        def __getitem__(self, key):
            current[0] = key
            return dict.__getitem__(self, key)

    methods = Tracking({name: (fn, True) for name in ("taca_cuda", "plain_cudnn", "materialized_authors")})
    rows = [
        {"shape": "s", "method": "taca_cuda", "fwd_ms": 1.0, "fwd_tflops": 100.0, "fwdbwd_ms": 10.0,
         "fwdbwd_tflops": 100.0},
        {"shape": "s", "method": "plain_cudnn", "fwd_ms": 6.0, "fwd_tflops": 100.0, "fwdbwd_ms": 60.0,
         "fwdbwd_tflops": 100.0},
        {"shape": "s", "method": "materialized_authors", "fwd_ms": 99.0, "fwd_tflops": 1.0},  # slow: one pass only
    ]
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    bag._more_rounds(rows, methods, q, k, v, 3, False, True, lambda *a: None)
    by = {r["method"]: r for r in rows}
    # round 2 starts at the second timed method (the rotation), round 3 at the first
    assert calls == ["plain_cudnn", "plain_cudnn", "taca_cuda", "taca_cuda",
                     "taca_cuda", "taca_cuda", "plain_cudnn", "plain_cudnn"]
    assert len(grads) == 4  # every fwd+bwd timing ran on inputs that require grad
    assert by["taca_cuda"]["fwd_ms_rounds"] == [1.0, 2.0, 3.0] and by["taca_cuda"]["fwd_ms"] == 2.0
    assert by["taca_cuda"]["fwdbwd_ms_rounds"] == [10.0, 20.0, 30.0] and by["taca_cuda"]["fwdbwd_ms"] == 20.0
    assert by["plain_cudnn"]["fwd_ms"] == 6.0 and by["plain_cudnn"]["fwdbwd_ms"] == 60.0
    assert by["taca_cuda"]["fwd_tflops"] == pytest.approx(50.0)  # rescaled to the median's time
    assert "fwd_ms_rounds" not in by["materialized_authors"] and by["materialized_authors"]["fwd_ms"] == 99.0


def test_nothing_timed_is_left_alone(monkeypatch):
    monkeypatch.setattr(bag, "_bench", lambda fn, quick: pytest.fail("nothing should be timed"))
    rows = [{"shape": "s", "method": "taca_cuda", "fwd_ms": None, "note": "out of memory"},
            {"shape": "s", "method": "materialized_authors", "fwd_ms": 99.0, "fwd_tflops": 1.0}]
    q = torch.randn(1, 1, 4, 8)
    bag._more_rounds(rows, {}, q, q, q, 3, False, True, lambda *a: None)
    assert rows[0]["fwd_ms"] is None and rows[1]["fwd_ms"] == 99.0 and "fwd_ms_rounds" not in rows[1]


def test_bad_rounds_refused():
    with pytest.raises(SystemExit):
        bag.main(["--rounds", "0"])


def test_gradient_errors_against_the_reference():
    """The gradient check the table reports (CPU stand-ins for the GPU tensors): the fp32 reference's own gradients
    (rounded to bf16) are within bf16 rounding of it; split SDPA on bf16 is a small nonzero distance, within the rule against itself; a method
    that drops gamma is far beyond the rule; the table shows the three errors and flags a failure."""
    from taca import reference

    gen = torch.Generator().manual_seed(0)
    B, H, N, D, L = 1, 2, 48, 16, 16
    q, k, v, do = (torch.randn(B, H, N, D, generator=gen).to(torch.bfloat16) for _ in range(4))
    gamma = torch.full((B,), 1.5)
    kw = dict(text_len=L, text_first=True, gamma=gamma)
    ref = bag.reference_grads(q, k, v, do, **kw)
    assert [r.dtype for r in ref] == [torch.float32] * 3 and ref[0].shape == q.shape

    def fp32(a, b, c):
        return reference.attention_ref(a.float(), b.float(), c.float(), upcast=torch.float32, **kw)[0]

    # the reference itself, its gradients rounded to the inputs' bf16: within half a bf16 unit of the largest
    own = bag.grad_errors(fp32, q, k, v, do, ref)
    assert all(e <= 2 ** -8 * float(r.abs().max()) for e, r in zip(own, ref)), own
    split = bag.grad_errors(lambda a, b, c: reference.attention_split_sdpa(a, b, c, **kw), q, k, v, do, ref)
    assert all(0 < e < 0.05 for e in split) and bag.grad_rule(split, split)
    no_gamma = bag.grad_errors(lambda a, b, c: reference.attention_split_sdpa(a, b, c, text_len=L, text_first=True,
                                                                              gamma=1.0), q, k, v, do, ref)
    assert not bag.grad_rule(no_gamma, split)
    rows = [{"shape": "s", "method": "taca_cuda", "fwd_ms": 1.0, "grad_err": split, "sdpa_grad_err": split,
             "grad_rule": True},
            {"shape": "s", "method": "wrong", "fwd_ms": 1.0, "grad_err": no_gamma, "sdpa_grad_err": split,
             "grad_rule": False}]
    md = bag.table(rows, "# t")
    line = [x for x in md.splitlines() if "| taca_cuda |" in x][0]
    assert " / ".join(f"{e:.1e}" for e in split) in line and "beyond the rule" not in line
    assert "beyond the rule" in [x for x in md.splitlines() if "| wrong |" in x][0]
