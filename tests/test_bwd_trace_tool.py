"""benchmarks/bwd_trace.py's analysis of a v6 backward trace, on synthetic traces with known answers
(the trace itself needs a TACA_BWD_TRACE build and a Hopper GPU; its numbers are in
benchmarks/results/bwd_trace_H200_20261204_*)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bwd_trace.py")


@pytest.fixture(scope="module")
def bt():
    spec = importlib.util.spec_from_file_location("bwd_trace_under_test", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _info(jt, pos, seg):
    return np.uint64(jt) | (np.uint64(pos) << np.uint64(16)) | (np.uint64(seg) << np.uint64(24))


def test_summarize_cta_times(bt):
    # 2 SMs; SM 0 runs CTAs 0 then 2, SM 1 runs CTA 1 only; ns, clock 2 GHz (cycles = 2 x ns)
    tr = np.zeros((3, bt.SLOTS), dtype=np.uint64)
    starts, ends, sms = [1000, 1000, 3500], [3000, 2000, 6000], [0, 1, 0]
    for i in range(3):
        tr[i, 0], tr[i, 1], tr[i, 2] = sms[i], starts[i], ends[i]
        tr[i, 3] = _info(i, i, 0)
        tr[i, 6] = 2 * 1000 * (i + 1)  # staging wait: 1, 2, 3 us at 2 GHz
        tr[i, 15] = 2 * (ends[i] - starts[i])
    r = bt.summarize(tr, n_sm=4)
    assert r["span_us"] == pytest.approx(5.0)
    assert r["clock_ghz"] == pytest.approx(2.0)
    assert r["cta_mean_us"] == pytest.approx((2.0 + 1.0 + 2.5) / 3)
    assert r["mean_us"]["empty_wait"] == pytest.approx(2.0)
    assert r["by_chain_position"]["empty_wait"] == pytest.approx([1.0, 2.0, 3.0])
    assert r["sms_used"] == 2 and r["sm_idle_unused_sms"] == 2
    # SM 0: a 0.5 us gap between its CTAs, no tail; SM 1: idle for the last 4 us
    assert r["sm_gap_us_per_sm"] == pytest.approx(0.5 / 2)
    assert r["sm_tail_idle_us_per_sm"] == pytest.approx(4.0 / 2)


def test_summarize_tiles_chain_lag(bt):
    # one chain of 4 links (CTAs 0..3), 8 tiles: link k releases tile x 3 us after link k - 1,
    # its poll sees the predecessor's release 0.5 us after it, the head takes 1.5 us staged -> released
    links, tiles, lag, obs = 4, 8, 3000, 500
    tr = np.zeros((links, bt.SLOTS), dtype=np.uint64)
    tt = np.zeros((links, bt.TILES, 4), dtype=np.uint64)
    for k in range(links):
        tr[k, 3] = _info(k, k, 0)
        for x in range(tiles):
            staged = 10_000 + 5_000 * x
            tt[k, x, 0] = staged
            tt[k, x, 2] = staged + 100
            tt[k, x, 3] = staged + 1_500 + k * lag
            if k > 0:
                tt[k, x, 1] = staged + 1_500 + (k - 1) * lag + obs
    r = bt.summarize_tiles(tr, tt, nqt=tiles)
    assert r["links"] == links - 1
    assert r["lag_us"]["median"] == pytest.approx(3.0)
    assert r["observe_us"]["median"] == pytest.approx(0.5)
    assert r["transfer_us"]["median"] == pytest.approx(2.5)
    assert r["head_staged_to_release_us"] == pytest.approx(1.5)
    assert r["staged_to_release_by_position_us"] == pytest.approx([1.5, 4.5, 7.5, 10.5])
    assert len(r["lag_by_tile_us"]) == tiles


def test_modes(bt):
    assert bt.mode_env("det") == (True, {})
    assert bt.mode_env("nd@s6+tw") == (False, {"TACA_BWD_NSEG": "6", "TACA_BWD_V6_WRITER": "tensor"})
    assert bt.mode_env("as") == (False, {"TACA_BWD_MODE": "atomicseg"})
    with pytest.raises(SystemExit, match="unknown mode 'fast'"):
        bt.mode_env("fast")


def test_plot_writes_a_figure_and_keeps_existing_ones(tmp_path):
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    tr = np.zeros((6, 16), dtype=np.int64)
    for i in range(6):
        tr[i, 0], tr[i, 1], tr[i, 2] = i % 3, 1000 + 2000 * (i // 3), 2800 + 2000 * (i // 3) + 100 * i
        tr[i, 3] = int(_info(i, i % 3, 0))
    raw = tmp_path / "bwd_trace_raw.safetensors"
    save_file({"tiny.det": torch.from_numpy(tr), "tiny.nd": torch.from_numpy(tr.copy())}, str(raw))
    plot = os.path.join(os.path.dirname(_PATH), "plot_bwd_trace.py")
    out = tmp_path / "fig.png"
    cmd = [sys.executable, plot, str(raw), "--shape", "tiny", "--modes", "det,nd", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = out.read_bytes()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "not overwritten" in r.stderr and out.read_bytes() == before
    r = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "g.png"), "--modes", "racy"], capture_output=True, text=True)
    assert r.returncode != 0 and "'tiny.racy' is not in" in r.stderr
