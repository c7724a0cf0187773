"""The package's top level: the lazy public names resolve once (then plain module attributes, no import machinery
per call: ~7 us of host time per taca.joint_attention call before), and importing taca and reaching the op pulls in
none of the heavy optional packages."""
import subprocess
import sys


def test_lazy_names_cached_and_light():
    code = (
        "import sys, taca\n"
        "assert 'joint_attention' not in vars(taca)\n"
        "f = taca.joint_attention\n"
        "import taca.ops\n"
        "assert f is taca.ops.joint_attention and vars(taca)['joint_attention'] is f\n"
        "heavy = [m for m in ('diffusers', 'matplotlib', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "try:\n"
        "    taca.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
