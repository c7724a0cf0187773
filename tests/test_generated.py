"""Generated sources match their generators: csrc/cuda/taca_wgmma.cuh is tools/gen_wgmma.py's output
(an edit to either alone would compile, and the wgmma check on a GPU would test the wrong file)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_wgmma_header_is_generated():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_wgmma.py")], check=True,
                         capture_output=True, text=True).stdout
    with open(os.path.join(ROOT, "csrc", "cuda", "taca_wgmma.cuh")) as f:
        assert f.read() == out, "csrc/cuda/taca_wgmma.cuh differs: run python tools/gen_wgmma.py > csrc/cuda/taca_wgmma.cuh"
