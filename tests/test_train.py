"""taca train on tiny FLUX and SD3.5 pipelines saved with save_pretrained (random weights, CPU):
the loss falls on a fixed batch, gamma is on in every training forward for every sample, the
control LoRA runs stock attention, the adapter loads through diffusers and taca.enable, resuming
is bitwise exact, two processes under accelerate launch (DDP, and FSDP2 with its checkpoints resumable
across layouts) match one, bad input fails early."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import taca  # noqa: E402
import taca.processors  # noqa: E402
from taca.cli import main as cli_main  # noqa: E402
from taca.train import ConfigError, TrainConfig, train  # noqa: E402
from taca.train import loop as train_loop  # noqa: E402

RES = 32  # 32x32 images: the tiny FLUX sees 16x16 = 256 image tokens (1-level VAE, 2x2 packing)
TEXT_LEN = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from taca.demo import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("models")
    build_tiny_flux_pipeline(seed=0).save_pretrained(str(root / "flux"))
    build_tiny_sd3_pipeline(seed=0, variant="sd35m").save_pretrained(str(root / "sd3"))
    return {"flux": str(root / "flux"), "sd3": str(root / "sd3")}


def _write_data(folder, n=16, seed=0):
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = ["red", "blue", "green", "yellow"]
    for i in range(n):
        h, w = int(rng.integers(32, 48)), int(rng.integers(32, 48))  # not square: exercises resize + crop
        arr = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3).astype(np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        arr[y:y + h // 2, x:x + w // 2] = rng.integers(0, 256, 3).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img{i:02d}.png"))
        with open(os.path.join(folder, f"img{i:02d}.txt"), "w") as f:
            f.write(f"a {colors[i % 4]} square on a {colors[(i + 1) % 4]} background")
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("data") / "pairs")


def _cfg(model, data, out, **kw):
    base = dict(model=model, data=data, out=str(out), resolution=RES, batch_size=2, max_steps=3,
                checkpoint_every=100, mixed_precision="no", max_sequence_length=TEXT_LEN, lr=1e-3, rank=4,
                report_to="none", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


class _GammaCounter:
    """Wraps the op the TACA processors call; records the gamma of every call."""

    def __init__(self, monkeypatch):
        self.gammas = []
        real = taca.processors.joint_attention

        def counting(*args, **kwargs):
            self.gammas.append(kwargs["gamma"].detach().clone())
            return real(*args, **kwargs)

        monkeypatch.setattr(taca.processors, "joint_attention", counting)


def _n_joint_attention(model_dir):
    from diffusers import DiffusionPipeline

    t = DiffusionPipeline.from_pretrained(model_dir).transformer
    n = 0
    for name, m in t.named_modules():
        if hasattr(m, "set_processor") and not name.endswith("attn2"):
            n += 1
    return n


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_gamma_on_in_every_training_forward(kind, models, data, tmp_path, monkeypatch):
    counter = _GammaCounter(monkeypatch)
    res = train(_cfg(models[kind], data, tmp_path / "out", grad_accum=2), progress=False)
    assert res.steps == 3 and len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    # every sampled timestep is in the window, every sample's forward had gamma 1.2
    assert len(res.sigmas) == 3 * 2 * 2 and min(res.sigmas) >= 0.97 and max(res.sigmas) <= 1.0
    assert res.gammas == pytest.approx([1.2] * len(res.sigmas))
    # counted through the processors: each joint attention of each forward (3 steps x 2 micro-batches)
    assert len(counter.gammas) == 3 * 2 * _n_joint_attention(models[kind])
    assert all(g.shape == (2,) and torch.allclose(g, torch.full((2,), 1.2)) for g in counter.gammas)
    for name in ("pytorch_lora_weights.safetensors", "train_config.json", "log.jsonl", "loss.png"):
        assert os.path.isfile(tmp_path / "out" / name), name
    with open(tmp_path / "out" / "train_config.json") as f:
        saved = json.load(f)
    assert saved["gamma"] == 1.2 and saved["t_min"] == 970.0 and saved["taca"] is True


def test_nondeterministic_reaches_the_op(models, data, tmp_path, monkeypatch):
    """--nondeterministic: every TACA attention call of training gets deterministic=False; it is
    saved in train_config.json and may change on --resume (it changes only the order of dQ adds)."""
    from taca.train.cli import config_from_args
    from taca.cli import build_parser

    args = build_parser().parse_args(["train", "--model", models["flux"], "--data", data, "--out",
                                      str(tmp_path / "x"), "--nondeterministic"])
    assert config_from_args(args).deterministic is False
    seen = []
    real = taca.processors.joint_attention
    monkeypatch.setattr(taca.processors, "joint_attention",
                        lambda *a, **kw: seen.append(kw["deterministic"]) or real(*a, **kw))
    res = train(_cfg(models["flux"], data, tmp_path / "out", max_steps=1, deterministic=False), progress=False)
    assert res.steps == 1 and seen and set(seen) == {False}
    with open(tmp_path / "out" / "train_config.json") as f:
        assert json.load(f)["deterministic"] is False
    from taca.train.config import RESUMABLE_CHANGES
    assert "deterministic" in RESUMABLE_CHANGES


def test_control_lora_runs_stock_attention(models, data, tmp_path, monkeypatch):
    counter = _GammaCounter(monkeypatch)
    steps = []
    res = train(_cfg(models["flux"], data, tmp_path / "out", taca=False), progress=False,
                on_step=lambda rec: steps.append(rec["step"]))
    assert counter.gammas == [] and res.gammas == [] and steps == [1, 2, 3]
    assert min(res.sigmas) >= 0.97  # same recipe: only the attention differs


def _fixed_batch_loss(model_dir, out_dir, lora, cfg):
    """The training loss on the first 4 cached samples with fixed sigmas and noise (TACA on)."""
    from diffusers import DiffusionPipeline

    from taca.train.data import Cache
    from taca.train.families import family_for

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    fam = family_for(pipe)
    t = pipe.transformer
    if lora:
        t.load_lora_adapter(os.path.join(out_dir, "pytorch_lora_weights.safetensors"), prefix="transformer")
    lat = sorted(os.listdir(os.path.join(out_dir, "cache", "latents")))[:4]
    txt = sorted(os.listdir(os.path.join(out_dir, "cache", "text")))[:4]
    x0 = torch.stack([Cache.read(os.path.join(out_dir, "cache", "latents", f))["latents"] for f in lat])
    cond = {k: torch.stack([Cache.read(os.path.join(out_dir, "cache", "text", f))[k] for f in txt])
            for k in ("prompt_embeds", "pooled_prompt_embeds")}
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.97, 0.98, 0.99, 1.0])
    with taca.enabled(t, gamma=1.2, schedule="paper"), torch.no_grad():
        return float(train_loop.flow_matching_loss(fam, t, x0, cond, sigma, noise, cfg, torch.float32).mean())


def test_loss_falls_on_a_fixed_batch(models, tmp_path, tmp_path_factory):
    small = _write_data(tmp_path_factory.mktemp("small") / "pairs", n=4, seed=3)
    cfg = _cfg(models["flux"], small, tmp_path / "out", batch_size=4, max_steps=25, lr=3e-3, rank=8)
    res = train(cfg, progress=False)
    before = _fixed_batch_loss(models["flux"], cfg.out, False, cfg)  # LoRA B starts at 0: the base model
    after = _fixed_batch_loss(models["flux"], cfg.out, True, cfg)
    assert after < 0.9 * before, (before, after, res.losses)


def test_adapter_loads_and_is_gated_by_gamma(models, data, tmp_path):
    from diffusers import DiffusionPipeline

    res = train(_cfg(models["flux"], data, tmp_path / "out", max_steps=4, lr=1e-2), progress=False)
    pipe = DiffusionPipeline.from_pretrained(models["flux"])
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    n, L = (RES // 2) ** 2, 8
    kw = dict(hidden_states=torch.randn(1, n, 4, generator=g), encoder_hidden_states=torch.randn(1, L, 64, generator=g),
              pooled_projections=torch.randn(1, 64, generator=g), img_ids=torch.rand(n, 3, generator=g),
              txt_ids=torch.zeros(L, 3), return_dict=False)
    with torch.no_grad():
        stock = {s: t(timestep=torch.tensor([s]), **kw)[0] for s in (0.5, 1.0)}
        with taca.enabled(pipe, gamma=1.2):
            taca_only = {s: t(timestep=torch.tensor([s]), **kw)[0] for s in (0.5, 1.0)}
        with taca.enabled(pipe, gamma=1.2, lora=res.out):
            with_lora = {s: t(timestep=torch.tensor([s]), **kw)[0] for s in (0.5, 1.0)}
        assert torch.equal(with_lora[0.5], stock[0.5])  # gamma = 1: stock model, adapter off
        assert not torch.allclose(with_lora[1.0], taca_only[1.0], atol=1e-5)  # gamma step: the adapter acts
        assert torch.equal(t(timestep=torch.tensor([1.0]), **kw)[0], stock[1.0])  # disable restores
        # diffusers' own loader takes the file as is (then the adapter is always on) ...
        pipe.load_lora_weights(res.out, adapter_name="mine")
        assert not torch.allclose(t(timestep=torch.tensor([0.5]), **kw)[0], stock[0.5], atol=1e-5)
        # ... and taca.enable gates that loaded adapter by name exactly as the file
        with taca.enabled(pipe, gamma=1.2, lora="mine"):
            torch.testing.assert_close(t(timestep=torch.tensor([1.0]), **kw)[0], with_lora[1.0], rtol=1e-5, atol=1e-6)
            assert torch.equal(t(timestep=torch.tensor([0.5]), **kw)[0], stock[0.5])


def test_sd3_adapter_loads_in_its_pipeline(models, data, tmp_path):
    from diffusers import DiffusionPipeline

    res = train(_cfg(models["sd3"], data, tmp_path / "out", max_steps=2, lr=1e-2, lora_targets="attn+ff",
                     precondition_outputs=True, timestep_sampling="logit-normal"), progress=False)
    pipe = DiffusionPipeline.from_pretrained(models["sd3"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red square", height=16, width=16, num_inference_steps=3, max_sequence_length=TEXT_LEN,
              output_type="pt")
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    with taca.enabled(pipe, gamma=1.2, lora=res.out):
        on = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.equal(on, base)
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kw).images, base)
    names = set(pipe.transformer.state_dict())
    assert not any("lora" in n for n in names)


def test_resume_is_bitwise(models, data, tmp_path):
    full = train(_cfg(models["flux"], data, tmp_path / "full", max_steps=5, checkpoint_every=2), progress=False)
    part = train(_cfg(models["flux"], data, tmp_path / "part", max_steps=3, checkpoint_every=2), progress=False)
    assert part.losses == full.losses[:3]
    ck = sorted(os.listdir(tmp_path / "part" / "checkpoints"))
    assert ck == ["checkpoint-000002", "checkpoint-000003"]
    # resume from step 3 (the last checkpoint, written at max_steps), continue to 5
    rest = train(_cfg(models["flux"], data, tmp_path / "part", max_steps=5, checkpoint_every=2, resume="latest"),
                 progress=False)
    assert rest.losses == full.losses[3:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "part" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "part" / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]
    # only the newest checkpoints_total_limit (3) are kept
    assert sorted(os.listdir(tmp_path / "part" / "checkpoints")) == \
        ["checkpoint-000003", "checkpoint-000004", "checkpoint-000005"]
    # a resume with other settings is refused
    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(models["flux"], data, tmp_path / "part", max_steps=6, resume="latest", lr=5e-4), progress=False)


def _launch_ddp(args, out, port, batch_size):
    """taca train in 2 CPU processes (gloo) under accelerate launch, batch_size each; returns the logged losses.
    accelerate's --cpu launcher starts one process; --multi_gpu starts torch.distributed.run, and --device cpu
    (Accelerator(cpu=True)) then selects MULTI_CPU with gloo."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "taca", "train", *args, "--out", str(out), "--batch-size", str(batch_size)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _assert_same_adapters(a_dir, b_dir, exact_layout=False):
    """The adapters saved in a_dir and b_dir: the same keys, tensors within rtol 1e-3 / atol 1e-5 (runs that differ
    in reduction order); exact_layout: also the same shapes and dtypes. Returns a_dir's tensors."""
    from safetensors.torch import load_file

    a = load_file(os.path.join(a_dir, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(b_dir, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and a
    if exact_layout:
        assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    return a


def test_two_processes_match_one(models, data, tmp_path):
    """accelerate launch with 2 CPU processes (gloo), batch 1 each, against 1 process with batch 2."""
    args = ["--model", models["flux"], "--data", data, "--resolution", str(RES), "--max-steps", "3",
            "--mixed-precision", "no", "--max-sequence-length", str(TEXT_LEN), "--lr", "1e-3", "--rank", "4",
            "--report-to", "none", "--checkpoint-every", "100", "--device", "cpu"]
    one = train(_cfg(models["flux"], data, tmp_path / "one", batch_size=2), progress=False)
    two = _launch_ddp(args, tmp_path / "two", 29517, batch_size=1)
    assert len(two) == 3
    # same samples, timesteps and noise; only the reduction order differs
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one.losses), rtol=1e-4, atol=1e-6)
    _assert_same_adapters(tmp_path / "one", tmp_path / "two")


def _launch_fsdp2(args, out, port, mixed_precision="no"):
    """taca train in 2 CPU processes under accelerate's FSDP2 path (examples/accelerate_fsdp2.yaml,
    through tests/fsdp_cpu.py: accelerate selects FSDP only on GPUs)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # NVLink multicast stays off wherever processes are launched (the device machines' rule)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", NCCL_NVLS_ENABLE="0",
               TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(root, "examples", "accelerate_fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", mixed_precision,
           "--main_process_port", str(port), os.path.join(root, "tests", "fsdp_cpu.py"), "train", *args,
           "--out", str(out), "--batch-size", "1"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # every rank's error lines first (the tail alone showed only rank 0's "connection reset" when rank 1 aborted)
    errors = [ln for ln in p.stderr.splitlines() if "Error" in ln or "error:" in ln or "Signal" in ln]
    assert p.returncode == 0, "\n".join(errors[-30:]) + "\n--- stderr tail:\n" + p.stderr[-3000:]
    return p.stdout + p.stderr  # taca train's messages go through tqdm.write (stdout)


def test_fsdp2_matches_one_process_and_checkpoints_cross_layouts(models, data, tmp_path):
    """FSDP2 (2 CPU processes, batch 1 each, every block and the LoRA sharded; 2 micro-batches per
    step, gradient checkpointing) against 1 process with batch 2: the same losses and adapter; its
    checkpoint (gathered tensors) resumes in one process, and one process's checkpoint resumes
    under FSDP2, both landing on the same step 3."""
    from safetensors.torch import load_file

    args = ["--model", models["flux"], "--data", data, "--resolution", str(RES), "--max-steps", "3",
            "--mixed-precision", "no", "--max-sequence-length", str(TEXT_LEN), "--lr", "1e-3", "--rank", "4",
            "--report-to", "none", "--checkpoint-every", "2", "--device", "cpu", "--grad-accum", "2",
            "--gradient-checkpointing"]
    one = train(_cfg(models["flux"], data, tmp_path / "one", batch_size=2, checkpoint_every=2, grad_accum=2,
                     gradient_checkpointing=True), progress=False)
    err = _launch_fsdp2(args, tmp_path / "fsdp", 29533)
    # the tiny FLUX: 2 double + 2 single blocks, the norm_out tail and the root are FSDP units, and
    # every parameter tensor (frozen weights and LoRA) is a shard
    assert "FSDP2: " in err and " parameter tensors sharded over 2 processes" in err, err[-2000:]
    n = err.split("FSDP2: ")[1].split(" parameter tensors")[0].split(" of ")
    assert int(n[0]) == int(n[1]) > 0, n
    with open(tmp_path / "fsdp" / "log.jsonl") as f:
        fs = [json.loads(line)["loss"] for line in f]
    torch.testing.assert_close(torch.tensor(fs), torch.tensor(one.losses), rtol=1e-4, atol=1e-6)
    a = _assert_same_adapters(tmp_path / "one", tmp_path / "fsdp", exact_layout=True)
    # the FSDP2 adapter loads into a pipeline through diffusers
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(models["flux"])
    pipe.load_lora_weights(str(tmp_path / "fsdp"))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())

    # FSDP2 checkpoint (full tensors, as a DDP one) -> one process
    res = train(_cfg(models["flux"], data, tmp_path / "fsdp", batch_size=2, checkpoint_every=2, grad_accum=2,
                     gradient_checkpointing=True, resume=str(tmp_path / "fsdp" / "checkpoints" / "checkpoint-000002")), progress=False)
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(one.losses[2:]), rtol=1e-4, atol=1e-6)
    _assert_same_adapters(tmp_path / "one", tmp_path / "fsdp")

    # one process's checkpoint -> FSDP2 (the moments are sharded like the parameters on load),
    # continuing the one-process run in its own --out (its adapter was read above)
    _launch_fsdp2([*args, "--resume", str(tmp_path / "one" / "checkpoints" / "checkpoint-000002")], tmp_path / "one",
                  29534)
    with open(tmp_path / "one" / "log.jsonl") as f:
        rs = [json.loads(line) for line in f]
    assert [r["step"] for r in rs] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([rs[2]["loss"]]), torch.tensor(one.losses[2:]), rtol=1e-4, atol=1e-6)
    d = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], d[k], rtol=1e-3, atol=1e-5)


def test_fsdp2_bf16_matches_one_process(models, data, tmp_path):
    """bf16 weights under FSDP2's mixed-precision policy (LoRA gradients reduced in float32) against
    one process under autocast: the same losses within bf16's rounding."""
    args = ["--model", models["flux"], "--data", data, "--resolution", str(RES), "--max-steps", "3",
            "--mixed-precision", "bf16", "--max-sequence-length", str(TEXT_LEN), "--lr", "1e-3", "--rank", "4",
            "--report-to", "none", "--checkpoint-every", "100", "--device", "cpu"]
    # the reference in its own process too: accelerate's state in this one is already float32
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "taca", "train", *args, "--out", str(tmp_path / "one"), "--batch-size",
                        "2"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = _launch_fsdp2(args, tmp_path / "fsdp", 29535, mixed_precision="bf16")
    assert "weights bfloat16" in out and "FSDP2: " in out
    losses = []
    for run in ("one", "fsdp"):
        with open(tmp_path / run / "log.jsonl") as f:
            losses.append(torch.tensor([json.loads(line)["loss"] for line in f]))
    assert len(losses[0]) == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=1e-5)


def test_unsupported_accelerate_layouts_are_refused():
    from types import SimpleNamespace

    def acc(version=2, ac=False, offload=False):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
            fsdp_version=version, activation_checkpointing=ac,
            cpu_offload=CPUOffloadPolicy() if offload else OffloadPolicy())))

    train_loop._check_distributed(acc(), "FSDP")
    train_loop._check_distributed(acc(), "MULTI_GPU")
    with pytest.raises(ConfigError, match="FSDP version 1; taca train shards with FSDP2"):
        train_loop._check_distributed(acc(version=1), "FSDP")
    with pytest.raises(ConfigError, match="fsdp_activation_checkpointing is not supported; use taca train --gradient"):
        train_loop._check_distributed(acc(ac=True), "FSDP")
    with pytest.raises(ConfigError, match="fsdp_offload_params is not supported"):
        train_loop._check_distributed(acc(offload=True), "FSDP")
    with pytest.raises(ConfigError, match="DEEPSPEED, which taca train does not support"):
        train_loop._check_distributed(acc(), "DEEPSPEED")


# --- bad input: exit 2, one message naming the argument, no model loaded, --out untouched -------
def _bad(tmp_path, monkeypatch, capsys, models, data, extra, match, out=None):
    calls = []
    monkeypatch.setattr(train_loop, "_load_pipeline", lambda *a, **k: calls.append(1))
    out = out or tmp_path / "out"
    args = ["train", "--model", models["flux"], "--data", data, "--out", str(out), "--resolution", str(RES),
            "--mixed-precision", "no", "--report-to", "none", *extra]
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    code = cli_main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert calls == []
    assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before


def test_bad_input(tmp_path, monkeypatch, capsys, models, data):
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    no_cap = tmp_path / "nocap"
    no_cap.mkdir()
    Image.new("RGB", (32, 32)).save(no_cap / "a.png")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (corrupt / "a.txt").write_text("a caption")
    b = lambda extra, match, **kw: _bad(tmp_path, monkeypatch, capsys, models, data, extra, match, **kw)  # noqa: E731
    b(["--data", str(empty)], "argument --data: ")
    b(["--data", str(no_cap)], "has no caption file a.txt")
    b(["--data", str(corrupt)], "is not a readable image")
    b(["--data", str(tmp_path / "missing")], "argument --data: ")
    b(["--rank", "0"], "argument --rank: must be an integer > 0")
    b(["--t-min", "1200"], "argument --t-min: must be in [0, 1000]")
    b(["--t-min", "-1"], "argument --t-min")
    b(["--resolution", "40"], "argument --resolution: must be a multiple of 16")
    b(["--model", str(tmp_path / "no-such-model")], "argument --model: ")
    b(["--lora-targets", "to_q,not_a_layer"], "argument --lora-targets: ['not_a_layer'] match no linear layer")
    b(["--max-sequence-length", "0"], "argument --max-sequence-length: must be a positive integer")
    b(["--max-sequence-length", "600"], "argument --max-sequence-length: FLUX.1, FLUX Kontext pipelines take at most")
    # a family taca.enable runs but taca train does not train, told from model_index.json alone
    other = tmp_path / "omnigen"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "OmniGenPipeline"}))
    b(["--model", str(other)], "is a OmniGen model, which taca train does not train (taca.enable runs it)")
    hidream = tmp_path / "hidream"
    hidream.mkdir()
    (hidream / "model_index.json").write_text(json.dumps({"_class_name": "HiDreamImagePipeline"}))
    b(["--model", str(hidream), "--max-sequence-length", "200"],
      "argument --max-sequence-length: HiDream-I1 pipelines take at most 128 text tokens, got 200")
    b(["--batch-size", "32"], "argument --batch-size: the data has 16 samples")
    b(["--resume", "latest"], "argument --resume: no checkpoint")
    used = tmp_path / "used"
    used.mkdir()
    (used / "pytorch_lora_weights.safetensors").write_bytes(b"the user's earlier adapter")
    b([], "argument --out: ", out=used)
    b(["--overwrite", "--resume", "latest"], "argument --overwrite", out=used)
    assert (used / "pytorch_lora_weights.safetensors").read_bytes() == b"the user's earlier adapter"
    with pytest.raises(ConfigError, match="--lora-targets"):
        TrainConfig(model=models["flux"], data=data, out=str(tmp_path / "x"), lora_targets="to_q;rm -rf").validate()


def test_a_family_refuses_an_option_before_loading(tmp_path, monkeypatch, capsys, models, data):
    """Family.check_config runs on the pipeline class read from model_index.json, before any weights
    load and before --out is written (the CLI exits 2 with its one-line message)."""
    from taca.train.families import FluxFamily

    seen = []

    def refuse(cls, cfg, pipeline_class):
        seen.append((cls.__name__, pipeline_class, cfg.rank))
        raise ConfigError("taca train: argument --rank: not with this pipeline (a test)")

    monkeypatch.setattr(FluxFamily, "check_config", classmethod(refuse))
    _bad(tmp_path, monkeypatch, capsys, models, data, ["--rank", "8"], "argument --rank: not with this pipeline")
    assert seen == [("FluxFamily", "FluxPipeline", 8)]


def test_the_last_line_says_how_to_load_the_adapter():
    """taca train's last message: the pipeline's load_lora_weights where it loads a transformer, the
    transformer's loader where the pipeline has none (Ovis-Image) or one for a UNet, and a family's own
    hint where neither works as is (PRX's transformer has no LoRA API)."""
    from taca.train.families import Family
    from taca.train.families.prx import PRXFamily

    def how(cls, pipeline_class):
        fam = cls.__new__(cls)
        fam.pipeline_class = pipeline_class
        return train_loop._how_to_load(fam)

    assert how(Family, "FluxPipeline").startswith("pipe.load_lora_weights(...)")
    assert "OvisImagePipeline has no load_lora_weights" in how(Family, "OvisImagePipeline")
    assert how(PRXFamily, "PRXPipeline").startswith("taca.train.families.prx.lora_support(pipe)")


def test_overwrite_replaces_only_what_train_wrote(models, data, tmp_path):
    out = tmp_path / "out"
    train(_cfg(models["flux"], data, out, max_steps=1), progress=False)
    (out / "notes.txt").write_text("mine")
    res = train(_cfg(models["flux"], data, out, max_steps=2, overwrite=True), progress=False)
    assert res.steps == 2 and (out / "notes.txt").read_text() == "mine"
    with open(out / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def _kohya_flux_file(path, inner=128, r=4, seed=0):
    """A kohya / sd-scripts style FLUX LoRA (BFL module names, lora_down/lora_up, alpha) for the
    tiny FLUX's two double blocks."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        for part, out_dim in (("img_attn_qkv", 3 * inner), ("img_attn_proj", inner),
                              ("txt_attn_qkv", 3 * inner), ("txt_attn_proj", inner)):
            k = f"lora_unet_double_blocks_{i}_{part}"
            sd[k + ".lora_down.weight"] = torch.randn(r, inner, generator=g) * 0.2
            sd[k + ".lora_up.weight"] = torch.randn(out_dim, r, generator=g) * 0.2
            sd[k + ".alpha"] = torch.tensor(float(r) / 2)
    save_file(sd, str(path))
    return str(path)


def _ai_toolkit_flux_file(model_dir, path, r=4, seed=1):
    """ai-toolkit style: transformer.<module path>.lora_A/lora_B.weight, no alpha, no metadata."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    t = DiffusionPipeline.from_pretrained(model_dir).transformer
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in t.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * 0.2
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * 0.2
    save_file(sd, str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["kohya", "ai-toolkit"])
def test_enable_loads_other_trainers_formats(fmt, models, tmp_path):
    """taca.enable(pipe, lora=FILE) takes what diffusers' own loader takes, and gates it."""
    from diffusers import DiffusionPipeline

    path = _kohya_flux_file(tmp_path / "k.safetensors") if fmt == "kohya" else \
        _ai_toolkit_flux_file(models["flux"], tmp_path / "a.safetensors")
    ref = DiffusionPipeline.from_pretrained(models["flux"])
    ref.load_lora_weights(str(tmp_path), weight_name=os.path.basename(path))
    pipe = DiffusionPipeline.from_pretrained(models["flux"])
    g = torch.Generator().manual_seed(0)
    n, L = 64, 8
    kw = dict(hidden_states=torch.randn(1, n, 4, generator=g), encoder_hidden_states=torch.randn(1, L, 64, generator=g),
              pooled_projections=torch.randn(1, 64, generator=g), img_ids=torch.rand(n, 3, generator=g),
              txt_ids=torch.zeros(L, 3), return_dict=False)
    with torch.no_grad():
        stock = pipe.transformer(timestep=torch.tensor([0.5]), **kw)[0]
        taca.enable(ref, gamma=1.2, schedule="constant")
        want = ref.transformer(timestep=torch.tensor([1.0]), **kw)[0]
        with taca.enabled(pipe, gamma=1.2, lora=path):
            got = pipe.transformer(timestep=torch.tensor([1.0]), **kw)[0]
            off = pipe.transformer(timestep=torch.tensor([0.5]), **kw)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(off, stock)
    assert not torch.allclose(got, pipe.transformer(timestep=torch.tensor([1.0]), **kw)[0], atol=1e-5)


def test_cache_that_cannot_fit_stops_after_its_first_batch(models, data, tmp_path, monkeypatch, capsys):
    """The first encoded batch tells an entry's size: when the rest cannot fit on the cache's disk (with
    SPARE_BYTES left), taca train stops there with one message naming --cache-dir, keeps what it wrote, and
    the same command then reuses it (an --out holding only the default cache starts afresh)."""
    import shutil
    from collections import namedtuple

    from taca.train.data import SPARE_BYTES

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    free = {"bytes": SPARE_BYTES + 64}  # less than one more text entry
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(*real(p)[:2], free["bytes"]))
    out = tmp_path / "out"
    args = ["train", "--model", models["flux"], "--data", data, "--out", str(out), "--resolution", str(RES),
            "--mixed-precision", "no", "--report-to", "none", "--batch-size", "2", "--max-steps", "1",
            "--max-sequence-length", str(TEXT_LEN), "--device", "cpu"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "argument --cache-dir: the text embeddings need about" in err and "2 entries of" in err, err
    assert "or a shorter --max-sequence-length" in err and "Traceback" not in err, err
    written = sorted(os.listdir(out / "cache" / "text"))
    assert len(written) == 2 and os.listdir(out) == ["cache"]  # the first batch of the 4 distinct captions
    mtimes = {n: os.path.getmtime(out / "cache" / "text" / n) for n in written}
    free["bytes"] = real(str(tmp_path)).free
    assert cli_main(args) == 0
    assert len(os.listdir(out / "cache" / "text")) == 4
    assert {n: os.path.getmtime(out / "cache" / "text" / n) for n in written} == mtimes  # reused, not rewritten
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")
