"""benchmarks/bwd_trace.py's analysis of a v6 backward trace, on synthetic traces with known answers
(the trace itself needs a TACA_BWD_TRACE build and a Hopper GPU; its numbers are in
benchmarks/results/bwd_trace_H200_20261204_*)."""
from __future__ import annotations

import importlib.util
import os
import re

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


def test_summarize256_per_tile_segments(bt):
    # 2 CTAs on 2 SMs, clock 2 GHz; CTA 0 walks 10 tiles, CTA 1 20 (per-tile means weigh each CTA alike)
    tr = np.zeros((2, bt.SLOTS256), dtype=np.uint64)
    tiles = [10, 20]
    for i in range(2):
        tr[i, 0], tr[i, 1] = i, 1000
        tr[i, bt.TR_LOOP_START] = 1500                     # 0.5 us of setup
        tr[i, 2] = 1500 + 4000 * (i + 1)                   # loop: 4 / 8 us
        tr[i, 4] = 2 * 4000 * (i + 1)                      # its cycles at 2 GHz
        tr[i, 5] = tiles[i]
        for k in range(len(bt.SEGS256)):                   # segment k: (k + 1) x 10 cycles a tile
            tr[i, bt.TR_SEG + k] = (k + 1) * 10 * tiles[i]
        tr[i, bt.TR_WRITER + 0] = 100 * tiles[i]           # writer 0 polls 100 cycles a tile, writer 1 300
        tr[i, bt.TR_WRITER + 5] = 300 * tiles[i]
        tr[i, bt.TR_WRITER + 4] = tr[i, 2] + 250           # writer 0 ends 0.25 us after the loop
        tr[i, bt.TR_WRITER + 9] = tr[i, 2] + 100
        tr[i, bt.TR_PRODUCER + 1] = 7 * tiles[i]
    r = bt.summarize256(tr, n_sm=4)
    assert r["clock_ghz"] == pytest.approx(2.0)
    assert r["setup_us"] == pytest.approx(0.5) and r["tail_us"] == pytest.approx(0.25)
    assert r["cta_mean_us"] == pytest.approx((4.75 + 8.75) / 2)
    assert r["span_us"] == pytest.approx(8.75)
    assert r["tiles_per_cta"] == pytest.approx(15.0)
    assert r["loop_cycles_per_tile"] == pytest.approx((8000 / 10 + 16000 / 20) / 2)
    assert list(r["segments_cycles_per_tile"]) == list(bt.SEGS256)
    assert r["segments_cycles_per_tile"]["q_wait"] == pytest.approx(10)
    assert r["segments_cycles_per_tile"]["stage1"] == pytest.approx(150)
    assert r["segments_share"]["stage1"] == pytest.approx(150 / 800)
    assert r["writer_cycles_per_tile"]["poll"] == pytest.approx(200)
    assert r["producer_cycles_per_tile"] == {"q_empty_wait": 0.0, "do_empty_wait": pytest.approx(7)}
    assert r["sms_used"] == 2 and r["sm_idle_unused_sms"] == 2
    # the slot layout is the kernel's: 15 segments from slot 6, writers from 21, producer 31, loop start 33
    assert (bt.TR_SEG, bt.TR_WRITER, bt.TR_PRODUCER, bt.TR_LOOP_START) == (6, 21, 31, 33)
    src = open(os.path.join(os.path.dirname(os.path.dirname(_PATH)), "csrc", "cuda", "taca_bwd_sm90_d256.cu")).read()
    assert "constexpr int kTraceSlots = 40, kTraceCtas = 4096;" in src
    enum = src[src.index("enum TSeg {"):src.index("kSegs\n};")]
    assert len(re.findall(r"^    kSeg\w+,", enum, re.M)) == len(bt.SEGS256)


def test_modes(bt):
    assert bt.mode_env("det") == (True, {})
    assert bt.mode_env("nd@s6+tw") == (False, {"TACA_BWD_NSEG": "6", "TACA_BWD_V6_WRITER": "tensor"})
    assert bt.mode_env("as") == (False, {"TACA_BWD_MODE": "atomicseg"})
    with pytest.raises(SystemExit, match="unknown mode 'fast'"):
        bt.mode_env("fast")
    trace256 = {"TACA_BWD_D256": "wgmma", "TACA_BWD_D256_TRACE": "1"}
    assert bt.mode_env("det", "d256") == (True, trace256)
    assert bt.mode_env("skip", "d256") == (True, {**trace256, "TACA_BWD_MODE": "skipdq"})
    assert bt.mode_env("nd@s2", "d256") == (False, {**trace256, "TACA_BWD_NSEG": "2"})
    assert bt.mode_env("det+oh", "d256") == (True, {**trace256, "TACA_BWD_D256_OWN": "1"})
    for wrong in ("as", "det+tw"):  # v6's trace-build modes
        with pytest.raises(SystemExit, match="for --kernel d256"):
            bt.mode_env(wrong, "d256")
    with pytest.raises(SystemExit, match="unknown mode 'skip' for --kernel v6"):
        bt.mode_env("skip")


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
