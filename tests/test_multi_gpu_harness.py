"""Issue 15's harness (benchmarks/gpu_multi_run.sh + bench_multi_gpu.py) in its CPU mode, so it is known
to run when a machine with several GPUs is lent: the demo's tiny FLUX, one process against DDP and
FSDP2 on 2 gloo processes with the same draws, eval generate on 1 and 2 processes, the report."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_multi_process_run_and_report(tmp_path):
    env = dict(os.environ, TINY="1", PY=sys.executable, OUT=str(tmp_path / "out"), W=str(tmp_path / "w"),
               TRAIN_STEPS="3", NPROC="2", HF_HUB_OFFLINE="1")
    p = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_multi_run.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(tmp_path / "out" / "multi_gpu.json") as f:
        res = json.load(f)
    train = res["train"]
    assert sorted(train) == ["ddp", "fsdp", "one"]
    assert [train[k]["world"] for k in ("one", "ddp", "fsdp")] == [1, 2, 2]
    assert {train[k]["global_batch"] for k in train} == {2} and all(train[k]["steps"] == 3 for k in train)
    # the same samples, timesteps and noise in every layout: float32 reduction order only
    assert all(train[k]["loss_max_rel_diff_vs_one"] < 1e-4 for k in ("ddp", "fsdp"))
    for k, a in res["adapters"].items():
        assert a["format_equal_to_one_process"] and a["loads"] and a["keys"] == a["lora_tensors_loaded"] > 0, (k, a)
        assert a["max_abs_diff_vs_one"] < 1e-4, (k, a)
    ev = res["eval"]
    assert ev["processes"] == 2 and ev["images"] == 16 and ev["same_names"] and ev["identical_files"], ev
    assert "| fsdp | 2 | 1 |" in p.stdout and "identical files True" in p.stdout
