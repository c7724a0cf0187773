"""tools/sass_loop_cmp.py on small hand-written nvdisasm listings (no GPU, no nvcc): what counts as the loop, and
which changes it calls identical, exact, register-renamed or moved."""
from __future__ import annotations

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "sass_loop_cmp.py")


def _tool():
    spec = importlib.util.spec_from_file_location("sass_loop_cmp_under_test", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _listing(name, body):
    lines = [f"\t.text.{name}:"]
    for i, ins in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {ins} ;  /* 0x000fe20000000f00 */")
    return "\n".join(lines) + "\n"


BODY = ["S2R R0, SR_TID.X", "IMAD.MOV.U32 R2, RZ, RZ, 0x40", "HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT",
        "FMUL R3, R24, R2", "@P0 BRA `(.L_x_12)", "HGMMA.64x64x16.F32 R24, gdesc[UR8], R24", "STG.E [R4.64], R3",
        "EXIT"]


def test_parse_strips_addresses_encodings_immediates_and_labels():
    t = _tool()
    f = t.parse(_listing("k1", BODY) + _listing("k2", BODY[:2]))
    assert list(f) == ["k1", "k2"]
    assert f["k1"][1] == "IMAD.MOV.U32 R2, RZ, RZ, X ;"
    assert f["k1"][4] == "@P0 BRA `(L) ;"
    assert len(f["k2"]) == 2


def test_loop_region_spans_first_to_last_hgmma_plus_tail():
    t = _tool()
    ins = t.parse(_listing("k", BODY))["k"]
    assert t.loop_region(ins, tail=1) == ins[2:6]
    assert t.loop_region(ins, tail=60) == ins[2:]
    assert t.loop_region(ins[:2]) == []


def test_compare_tells_identical_exact_renamed_and_moved():
    t = _tool()
    a = t.parse(_listing("k", BODY))
    # outside the loop only: loop exact
    pre = t.parse(_listing("k", ["NOP"] + BODY))
    # the same loop with other registers
    ren = t.parse(_listing("k", [x.replace("R3", "R7") for x in BODY]))
    # an instruction moved inside the loop
    moved = BODY[:3] + [BODY[4], BODY[3]] + BODY[5:]
    mov = t.parse(_listing("k", moved))
    r_same, r_pre, r_ren, r_mov = (t.compare(a, x)[0] for x in (a, pre, ren, mov))
    assert r_same["identical"] and r_same["loop_exact"]
    assert not r_pre["identical"] and r_pre["loop_exact"]
    assert not r_ren["loop_exact"] and r_ren["loop_normalized_equal"]
    assert not r_mov["loop_normalized_equal"] and 0.0 < r_mov["loop_ratio"] < 1.0
    assert t.compare(a, mov, match="other") == []


def test_cli_cmp_prints_status_per_function(tmp_path, capsys):
    t = _tool()
    pa, pb = tmp_path / "a.sass", tmp_path / "b.sass"
    pa.write_text(_listing("v6_kernel_x", BODY))
    pb.write_text(_listing("v6_kernel_x", [x.replace("R3", "R7") for x in BODY]))
    assert t.main(["cmp", str(pa), str(pb), "--diff", "v6_kernel_x"]) == 0
    out = capsys.readouterr().out
    assert "same instructions, other registers" in out
    assert t.main(["cmp", str(pa), str(pb), "--match", "nothing"]) == 1
