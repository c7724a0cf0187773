"""taca.mini.pretrain: the loss goes down, checkpoints resume exactly, the CLI runs and resumes."""
import json
import os

import pytest
import torch

from taca.mini import pretrain as P

TINY = ["--tiny", "--device", "cpu", "--batch", "8", "--warmup", "1", "--lr", "3e-3", "--no-progress"]


def _args(tmp_path, *extra):
    return P.parse_args(["--out", str(tmp_path / "ckpt"), *TINY, *extra])


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tmp_path):
    tr = P.Trainer(_args(tmp_path))
    batch = tr.sample_batch(8)
    with torch.no_grad():
        before = float(tr.loss_on(*batch))
    for _ in range(6):
        tr.step(batch)
    with torch.no_grad():
        after = float(tr.loss_on(*batch))
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("prefetch,done", [(3, 2), (2, 2)])  # resume inside a data chunk, and at its end
def test_resume_gives_the_same_next_loss(tmp_path, prefetch, done):
    a = _args(tmp_path, "--prefetch", str(prefetch))
    tr = P.Trainer(a)
    for _ in range(done):
        tr.step()
    tr.save(a.out)
    expected = float(tr.step())
    resumed = P.Trainer(a)
    resumed.load(a.out)
    assert resumed.step_count == done
    assert float(resumed.step()) == expected
    # EMA and optimizer moments came back too
    torch.testing.assert_close(resumed.ema[0], tr.ema[0], rtol=1e-2, atol=1e-3)
    assert all(resumed.opt.state[p] for p in resumed.params.values())


def test_cli_runs_saves_and_resumes_into_another_folder(tmp_path):
    first = tmp_path / "first"
    second = tmp_path / "second"
    common = [*TINY, "--log-every", "1", "--eval-per-category", "1", "--eval-steps", "2", "--eval-guidance", "2.0"]
    assert P.main(["--out", str(first), "--max-steps", "2", *common]) == 0
    assert set(P.CKPT_FILES) <= set(os.listdir(first))
    assert P.main(["--out", str(second), "--resume", str(first), "--max-steps", "4", *common]) == 0
    state = json.load(open(second / "state.json"))
    assert state["step"] == 4
    recs = [json.loads(line) for line in open(second / "log.jsonl")]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    ev = [r for r in recs if r["kind"] == "eval"]
    assert len(ev) == 2 and set(ev[-1]["accuracy"]) >= {"all"} and ev[-1]["accuracy"]["all"]["n"] == 5
    # a wall-clock budget already spent: no step, still a checkpoint
    assert P.main(["--out", str(tmp_path / "third"), "--resume", str(second), "--max-seconds", "0.001", "--no-eval",
                   *TINY]) == 0
    assert json.load(open(tmp_path / "third" / "state.json"))["step"] == 4
    # export: a loadable MiniPipeline folder in bf16
    out = tmp_path / "pipe"
    P.main(["export", "--ckpt", str(second), "--out", str(out)])
    from taca.mini import model as M

    from safetensors import safe_open

    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    card = (out / "README.md").read_text()
    assert "4 steps of batch 8" in card and "| 4 | 2.0 |" in card
    pipe = M.load_pipeline(str(out))
    assert pipe("a red circle", num_inference_steps=2, output_type="latent").images.shape == (1, 3, 32, 32)
    # curves: the loss and accuracy figure, from the resumed run's log (one resume line drawn)
    fig = tmp_path / "curves.png"
    P.main(["curves", "--log", str(second / "log.jsonl"), "--out", str(fig)])
    from PIL import Image

    w, h = Image.open(fig).size
    assert w > 2 * h > 0
    with pytest.raises(SystemExit, match="--log .* is not a file"):
        P.main(["curves", "--log", str(tmp_path / "none.jsonl"), "--out", str(fig)])


def test_bad_arguments_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="--batch must be >= 1"):
        _args(tmp_path, "--batch", "0")
    with pytest.raises(SystemExit, match="--total-steps must be > --cooldown-start"):
        _args(tmp_path, "--cooldown-start", "10")
    with pytest.raises(SystemExit, match="has no state.json"):
        P.run(_args(tmp_path, "--resume", str(tmp_path / "nowhere")))
