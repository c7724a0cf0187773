"""Pieces shared by the per-family ``taca train`` tests (tests/test_train_*.py), imported as
``from train_checks import ...`` (like tests/model_checks.py for the adapter tests).

- the recipe: :func:`train_config` (tests/test_train.py's TrainConfig, any field in kw in its
  place), :func:`write_data`, :class:`GammaCounter`, :func:`launch_ddp` and :func:`assert_same_adapters`
  (re-exported from tests/test_train.py),
  :func:`load`, :func:`text_cond`, :func:`checked_family`, :func:`record_calls` (a transformer's calls with their
  gamma), :func:`record_forwards` (a model class's forward kwargs, training runs included), :func:`peft_hits`,
  :func:`flux_attn_names` / :func:`flux_ff_names` (target-name expectations);
- module fixtures: :func:`model_fixture`, :func:`data_fixture` and :func:`run_fixture` (one TACA
  run, every gamma recorded) make them; :func:`cache_dir` and the autouse :func:`one_torch_thread`
  are fixtures to import by name;
- tiny builders more than one family file uses: :func:`qwen2_bpe_tokenizer`, :data:`SHORT` /
  :data:`LONG` and :func:`write_captioned_data` (the Qwen-Image-like tests' captions),
  :func:`qwenimage_vae` (Qwen-Image, Krea 2), :func:`spelled_out` (BPE merges; Lumina 2, Z-Image);
- checks of a training run (:func:`check_taca_run`, :func:`control_run`, :func:`checkpointed_run`,
  :func:`check_control_and_checkpointing`, :func:`check_same_adapter`, :func:`saved_lora_modules`,
  :func:`cached_text`), of the cache and predict (:func:`check_alone_as_in_batch`,
  :func:`check_batch_independent`), of the latents (:func:`check_flux_vae_latents`,
  :func:`check_zero_model_decodes`, :func:`check_last_latents_decode`,
  :func:`check_qwenimage_latents`), and of the saved adapter through taca.enable(lora=) and
  diffusers' load_lora_weights (:func:`check_gated_pipeline`, :func:`check_adapter_in_pipeline`,
  :func:`check_transformer_loaded_adapter` where the pipeline has no load_lora_weights,
  :func:`check_adapter_gates_predict`, :func:`check_lora_layers`).
"""
import inspect
import json
import os

import pytest
import torch

import taca
from taca.train import train
from test_train import _assert_same_adapters, _cfg, _GammaCounter, _launch_ddp, _write_data

GammaCounter = _GammaCounter  # records every gamma the TACA processors pass to taca.processors.joint_attention
write_data = _write_data  # n coloured-square images with captions, 32 to 47 px a side (not square)
launch_ddp = _launch_ddp  # taca train in 2 gloo CPU processes under accelerate launch: the logged losses
assert_same_adapters = _assert_same_adapters  # two saved adapters equal to rtol 1e-3 / atol 1e-5

RUN_FILES = ("pytorch_lora_weights.safetensors", "train_config.json", "log.jsonl", "loss.png")
ADAPTER = RUN_FILES[0]


# --- the recipe and the module fixtures ----------------------------------------------------------
def train_config(model, data, out, **kw):
    """tests/test_train.py's TrainConfig (32 px, 16 text tokens, batch 2, 3 steps, lr 1e-3, rank 4,
    float32 on the CPU, a checkpoint every 100 steps, no reporting) with any field in kw in its place."""
    return _cfg(model, data, out, **kw)


def load(path):
    """DiffusionPipeline.from_pretrained(path) with its progress bar off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_fixture(build, name):
    """A module fixture: build() saved with save_pretrained in <tmp>/models<N>/<name>; the folder."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        d = tmp_path_factory.mktemp("models") / name
        build().save_pretrained(str(d))
        return str(d)

    return fixture


def data_fixture(n, write=write_data):
    """A module fixture: n image / caption pairs written by write in <tmp>/data<N>/pairs; the folder."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        return write(tmp_path_factory.mktemp("data") / "pairs", n=n)

    return fixture


def run_fixture(run, where=("run", "out")):
    """A module fixture: one training run, run(out=..., **fixtures) where out is a fresh
    <tmp>/<where[0]><N>/<where[1]> and the fixtures are those named by run's other parameters,
    with every gamma the TACA processors pass to the op recorded; gives (the TrainResult, the gammas)."""
    names = [p for p in inspect.signature(run).parameters if p != "out"]

    @pytest.fixture(scope="module")
    def fixture(request, tmp_path_factory):
        values = {n: request.getfixturevalue(n) for n in names}
        with pytest.MonkeyPatch.context() as mp:
            counter = GammaCounter(mp)
            res = run(out=tmp_path_factory.mktemp(where[0]) / where[1], **values)
        return res, counter.gammas

    return fixture


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache folder shared by a module's training runs: one model, one encoding."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread for the whole module that imports it (training runs included): the tiny
    models' ops cost less than waking a second thread, many times over on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def text_cond(fam, captions, length):
    """What training hands predict: encode at max_sequence_length, split per caption (the cache), collate."""
    return fam.collate(fam.split_text(fam.encode_text(captions, torch.device("cpu"), length)))


def checked_family(pipe, cls, name):
    """family_for(pipe), checked to be a cls named name."""
    from taca.train.families import family_for

    fam = family_for(pipe)
    assert isinstance(fam, cls) and fam.name == name
    return fam


# --- Qwen-style text: the tokenizer, captions and data of the Qwen-Image-like tests ------------------
SHORT, LONG = "a red square", "a big yellow square on a green background next to a blue circle"
WORDS = "a big small red blue green yellow square circle on next to the background"


def qwen2_bpe_tokenizer(template):
    """A byte-level BPE Qwen2Tokenizer whose merges make every word of the prompt template and of
    the test's captions one token, as Qwen's real vocabulary does: the template's prefix is then
    34 tokens, the pipeline's drop index, and what encode_prompt drops is the template, no more."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([  # Qwen2Tokenizer's own pre-tokenization
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([template.format(WORDS), WORDS, SHORT, LONG], trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=["<|im_start|>", "<|im_end|>"])


VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # Qwen-VL's vision tokens


def qwen3vl_processor(template, chat_template):
    """A Qwen3VLProcessor around qwen2_bpe_tokenizer(template) with Qwen's chat and :data:`VISION` tokens
    added. Its video processor is built without torchvision but fails transformers' class check (whose
    lookup needs torchvision): relaxed for that argument."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor
    from transformers import processing_utils as pu
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tok = qwen2_bpe_tokenizer(template)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *VISION]})
    check = pu.ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pu.ProcessorMixin, "check_argument_for_proper_class",
                   lambda self, name, arg: type(arg) if name == "video_processor" else check(self, name, arg))
        return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok,
                                video_processor=Qwen3VLVideoProcessor(), chat_template=chat_template)


def spelled_out(words, space, vocab):
    """BPE merges spelling out each word, with and without the leading-space symbol space, one
    character at a time; every prefix is added to vocab (in place). Returns the merges."""
    merges = []
    for w in dict.fromkeys(words):
        for s in (space + w, w):
            cur = s[0]
            for ch in s[1:]:
                if (cur, ch) not in merges:
                    merges.append((cur, ch))
                cur += ch
                vocab.setdefault(cur, len(vocab))
    return merges


def write_captioned_data(folder, n=4, seed=0):
    """n 40x36 images (a coloured rectangle on a coloured ground) captioned SHORT, LONG and two
    more captions of WORDS, in turn."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = [SHORT, LONG, "a blue circle", "a small green square on a red background"]
    for i in range(n):
        arr = np.zeros((40, 36, 3), np.uint8) + rng.integers(0, 256, 3).astype(np.uint8)
        arr[5:25, 8:30] = rng.integers(0, 256, 3).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img{i:02d}.png"))
        with open(os.path.join(folder, f"img{i:02d}.txt"), "w") as f:
            f.write(captions[i % len(captions)])
    return str(folder)


LATENTS_MEAN = [0.3, -0.7, 0.1, 1.2]  # non-trivial normalization (Qwen-Image's are per channel too)
LATENTS_STD = [0.5, 2.0, 1.5, 0.8]


def qwenimage_vae():
    """The tiny AutoencoderKLQwenImage of the Qwen-Image and Krea 2 tests: factor 4, 4 channels,
    normalized per channel by LATENTS_MEAN / LATENTS_STD."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=LATENTS_MEAN,
                                  latents_std=LATENTS_STD).eval()


def check_alone_as_in_batch(fam, length, n_tokens):
    """The cache entries of SHORT and LONG encoded together (max_sequence_length length) have
    n_tokens tokens, prompt_embeds only, and are each caption's entry encoded alone (to 1e-5).
    Returns the entries: ([SHORT's alone], [both], [LONG's alone])."""
    cpu = torch.device("cpu")
    alone = fam.split_text(fam.encode_text([SHORT], cpu, length))
    both = fam.split_text(fam.encode_text([SHORT, LONG], cpu, length))
    long_alone = fam.split_text(fam.encode_text([LONG], cpu, length))
    assert [e["prompt_embeds"].shape[0] for e in both] == n_tokens and set(both[0]) == {"prompt_embeds"}
    torch.testing.assert_close(both[0]["prompt_embeds"], alone[0]["prompt_embeds"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1]["prompt_embeds"], long_alone[0]["prompt_embeds"], rtol=1e-5, atol=1e-6)
    return alone, both, long_alone


def check_qwenimage_latents(pipe, fam, res, decode, pack=None):
    """With qwenimage_vae: encode_images = (mode - LATENTS_MEAN) / LATENTS_STD per channel, 5-D;
    decode(callback), the pipeline run to output_type="pt" with callback_on_step_end=callback,
    which swaps these latents in at its last step (packed as its loop keeps them: pack(latents),
    by default Qwen-Image's 2x2 packing of the one frame), gives back vae.decode(mode): its own
    decode path (denormalize, vae.decode) inverts encode_images."""
    vae = pipe.vae
    g = torch.Generator().manual_seed(3)
    px = torch.rand(2, 3, res, res, generator=g) * 2 - 1
    with torch.no_grad():
        lat = fam.encode_images(px)
        mode = vae.encode(px.unsqueeze(2)).latent_dist.mode()
        assert lat.shape == (2, 4, 1, res // 4, res // 4) == mode.shape
        mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1, 1)
        std = torch.tensor(LATENTS_STD).view(1, 4, 1, 1, 1)
        torch.testing.assert_close(lat, (mode - mean) / std, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(lat, mode, atol=1e-2)  # the normalization is not the identity here

        packed = pack(lat) if pack else pipe._pack_latents(lat[:, :, 0], 2, 4, res // 4, res // 4)
        images = decode(lambda p, i, t, kw: {"latents": packed.clone()})
        expect = pipe.image_processor.postprocess(vae.decode(mode).sample[:, :, 0], output_type="pt")
    torch.testing.assert_close(images, expect, rtol=1e-5, atol=1e-5)


def check_flux_vae_latents(fam, vae, px, shape):
    """encode_images(px) has the shape and is (mode - 0.1159) * 0.3611: the posterior mode under the
    FLUX VAE's shift and scale. Returns (the latents, the mode)."""
    lat = fam.encode_images(px)
    assert lat.shape == shape
    with torch.no_grad():
        mode = vae.encode(px).latent_dist.mode()
        torch.testing.assert_close(lat, (mode - 0.1159) * 0.3611)
    return lat, mode


def check_zero_model_decodes(pipe, mode, monkeypatch, call):
    """pipe(**call) (its latents the encoded ones, 2 steps) with a transformer that predicts 0, so
    that the Euler steps keep the latents: the pipeline's own unpack, denormalization and decode give
    the VAE's reconstruction of mode."""
    with torch.no_grad():
        want = (pipe.vae.decode(mode).sample / 2 + 0.5).clamp(0, 1)
        monkeypatch.setattr(pipe.transformer, "forward", lambda hidden_states, **kw: (torch.zeros_like(hidden_states),))
        got = pipe(prompt=["a cat", "a dog"], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                   **call).images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def check_last_latents_decode(pipe, res, side, call):
    """With the FLUX VAE's shift 0.1159 and scale 0.3611 in the pipeline's VAE: encode_images of a
    res x res image (check_flux_vae_latents, side x side latents), put in place of the pipeline's
    last latents (pipe(**call) for "a red square", one step, callback_on_step_end), decode through
    the pipeline's own un-normalization and VAE decode to the VAE's reconstruction of the mode."""
    from taca.train.families import family_for

    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.1159, 0.3611)
    fam = family_for(pipe)
    px = torch.rand(1, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat, mode = check_flux_vae_latents(fam, pipe.vae, px, (1, 4, side, side))
    with torch.no_grad():
        want = pipe.image_processor.postprocess(pipe.vae.decode(mode).sample, output_type="pt")
        got = pipe(prompt="a red square", num_inference_steps=1, output_type="pt",
                   callback_on_step_end=lambda p, i, t, kw: {"latents": lat.clone()}, **call).images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class Record:
    """Records every forward call of a module: (its keyword arguments, its first output)."""

    def __init__(self, module):
        self.calls = []
        self.h = module.register_forward_hook(
            lambda m, a, kw, out: self.calls.append((dict(kw), out[0].detach().clone())), with_kwargs=True)


# the joint-attention projections of FLUX.1-layout blocks (and clones: Bria, Ovis-Image, LongCat, HunyuanImage)
FLUX_DOUBLE_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX_SINGLE_ATTN = ("to_q", "to_k", "to_v")


def peft_hits(linear, keys):
    """The Linear layer names PEFT targets for keys (a full name or a ".name" suffix)."""
    return {n for n in linear if any(n == k or n.endswith("." + k) for k in keys)}


def flux_attn_names(n_double, n_single, double=FLUX_DOUBLE_ATTN, single=FLUX_SINGLE_ATTN):
    """The full names of the joint-attention projections of n_double double- and n_single single-stream
    FLUX.1-layout blocks (``transformer_blocks.<i>.attn.<p>``, ``single_transformer_blocks.<i>.attn.<p>``)."""
    return ([f"transformer_blocks.{i}.attn.{p}" for i in range(n_double) for p in double]
            + [f"single_transformer_blocks.{i}.attn.{p}" for i in range(n_single) for p in single])


def flux_ff_names(n_double):
    """The double-stream blocks' feed-forward Linear names (``ff`` / ``ff_context``, FLUX.1's layout)."""
    return {f"transformer_blocks.{i}.{f}.{p}" for i in range(n_double) for f in ("ff", "ff_context")
            for p in ("net.0.proj", "net.2")}


def record_calls(transformer):
    """Records every call of a transformer instance: (its keyword arguments, its first output, the TACA
    gamma of the call or None). Returns (calls, the hook handle)."""
    from taca.pipeline import get_handle

    calls = []

    def hook(m, args, kwargs, out):
        h = get_handle(m)
        calls.append((dict(kwargs), out[0].detach().clone(), None if h is None else h.last_gamma))

    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


def record_forwards(monkeypatch, cls, keys=("hidden_states",)):
    """Every forward of the model class cls from now on (a training run loads its own pipeline, so
    the class's forward is wrapped): detached copies of the keyword arguments named in keys."""
    calls = []
    real = cls.forward

    def forward(self, *args, **kw):
        calls.append({k: kw[k].detach().clone() for k in keys})
        return real(self, *args, **kw)

    monkeypatch.setattr(cls, "forward", forward)
    return calls


def cached_text(res):
    """Every entry of the text cache a run used (the cache_dir in its train_config.json)."""
    from taca.train.data import Cache

    with open(os.path.join(res.out, "train_config.json")) as f:
        text = os.path.join(json.load(f)["cache_dir"], "text")
    return [Cache.read(os.path.join(root, f)) for root, _, files in os.walk(text) for f in files]


# --- checks ----------------------------------------------------------------------------------------
def check_gammas(gammas, n):
    """n recorded gammas, each 1.2 for every sample."""
    assert len(gammas) == n
    assert all(torch.allclose(g, torch.full((2,), 1.2)) for g in gammas)


def check_taca_run(res, gammas, n_calls, files=RUN_FILES):
    """A TACA run of 3 steps of batch 2: finite losses, every sigma in the window [0.97, 1] with
    gamma 1.2, n_calls gammas of shape (2,) at the op, all 1.2 (None: not checked here), and its
    files written."""
    assert res.steps == 3 and len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    assert len(res.sigmas) == 3 * 2 and min(res.sigmas) >= 0.97 and max(res.sigmas) <= 1.0
    assert res.gammas == pytest.approx([1.2] * len(res.sigmas))
    if n_calls is not None:
        assert len(gammas) == n_calls
        assert all(g.shape == (2,) and torch.allclose(g, torch.full((2,), 1.2)) for g in gammas)
    for name in files:
        assert os.path.isfile(os.path.join(res.out, name)), name


def check_control(res, gammas):
    """A control run (taca=False): no gamma at the op nor in the result, finite losses, the same
    sigma window."""
    assert gammas == [] and res.gammas == []
    assert all(torch.isfinite(torch.tensor(res.losses))) and min(res.sigmas) >= 0.97


def control_run(cfg, out, monkeypatch, **kw):
    """Trains cfg(out, taca=False, **kw) with the gammas recorded, checks it is a control run
    (check_control); its result."""
    gammas = GammaCounter(monkeypatch).gammas
    res = train(cfg(out, taca=False, **kw), progress=False)
    check_control(res, gammas)
    return res


def checkpointed_run(cfg, ref, out, monkeypatch, n_calls):
    """Trains cfg(out, gradient_checkpointing=True) with the gammas recorded: n_calls gammas, all
    1.2 (each checkpointed block runs again in the backward, with its gamma), and the losses of ref,
    the same run without checkpointing; its result."""
    gammas = GammaCounter(monkeypatch).gammas
    res = train(cfg(out, gradient_checkpointing=True), progress=False)
    check_gammas(gammas, n_calls)
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-7)
    return res


def saved_lora_modules(out):
    """The modules of the adapter saved in out (its keys up to ".lora_")."""
    from safetensors.torch import load_file

    return {k.split(".lora_")[0] for k in load_file(os.path.join(out, ADAPTER))}


def check_same_adapter(ref_out, out):
    """The adapter saved in out is the (trained, nonzero) one saved in ref_out, to 1e-4."""
    from safetensors.torch import load_file

    a = load_file(os.path.join(ref_out, ADAPTER))
    b = load_file(os.path.join(out, ADAPTER))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert not any(torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it did train


def check_control_and_checkpointing(cfg, tmp_path, monkeypatch, n_joint):
    """A 2-step control run (check_control), then a 2-step TACA run with gradient checkpointing:
    every joint attention of the forward, and again where the backward recomputes the blocks, gets
    gamma 1.2 (n_joint per forward), finite losses."""
    gammas = GammaCounter(monkeypatch).gammas
    res = train(cfg(tmp_path / "control", taca=False, max_steps=2), progress=False)
    check_control(res, gammas)
    res = train(cfg(tmp_path / "gc", gradient_checkpointing=True, max_steps=2), progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    check_gammas(gammas, 2 * 2 * n_joint)
    assert res.gammas == pytest.approx([1.2] * 4)


def check_batch_independent(fam, t, noisy, sigma, entries, guidance=1.0, rtol=1e-5, atol=1e-5, **enable):
    """With TACA on (taca.enabled(t, gamma=1.2, **enable)), predict on the collated batch of the
    cache entries equals predict on each entry alone, within rtol / atol."""
    with taca.enabled(t, gamma=1.2, **enable), torch.no_grad():
        together = fam.predict(t, noisy, sigma, fam.collate(entries), guidance)
        for j, e in enumerate(entries):
            single = fam.predict(t, noisy[j:j + 1], sigma[j:j + 1], fam.collate([e]), guidance)
            torch.testing.assert_close(together[j:j + 1], single, rtol=rtol, atol=atol)


def check_gated_pipeline(pipe, adapter, call):
    """taca.enable(pipe, lora=adapter) puts LoRA layers in and changes the pipeline's (finite)
    output for pipe(**call) from seed 0; disabling gives the stock output back bit for bit, without
    a LoRA layer left. Returns the stock output."""
    base = pipe(generator=torch.Generator().manual_seed(0), **call).images
    with taca.enabled(pipe, gamma=1.2, lora=adapter):
        assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
        on = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert torch.isfinite(on).all() and not torch.equal(on, base)
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **call).images, base)  # disabled: stock
    assert not any("lora" in n for n in pipe.transformer.state_dict())
    return base


def check_adapter_in_pipeline(load_pipe, adapter, call, n_lora_a, prefix="layers."):
    """check_gated_pipeline on load_pipe(); then diffusers' load_lora_weights on a fresh one gives
    n_lora_a lora_A matrices, all under prefix, and a finite output other than the stock one."""
    base = check_gated_pipeline(load_pipe(), adapter, call)
    fresh = load_pipe()
    fresh.load_lora_weights(adapter)
    names = [n for n, _ in fresh.transformer.named_parameters() if "lora_A" in n]
    assert len(names) == n_lora_a and all(n.startswith(prefix) for n in names)
    lora = fresh(generator=torch.Generator().manual_seed(0), **call).images
    assert torch.isfinite(lora).all() and not torch.allclose(lora, base, atol=1e-7)


def check_transformer_loaded_adapter(load_pipe, adapter, call, names, x, text_len, scale):
    """For pipelines without load_lora_weights (Bria, Ovis-Image in diffusers 0.42.1): check_gated_pipeline
    on load_pipe(); the transformer's load_lora_adapter(prefix="transformer") on a fresh one puts LoRA
    layers on exactly the modules named, with the trained scale (alpha / rank, from the file's metadata);
    with TACA on, the family's predict at sigma 0.99 through it equals predict under taca.enable(pipe,
    lora=adapter) (to 1e-6) and differs from the stock model's."""
    from taca.train.families import family_for

    check_gated_pipeline(load_pipe(), adapter, call)
    fresh = load_pipe()
    fam = family_for(fresh)
    assert not hasattr(fresh, "load_lora_weights")  # else its own loader is the one to test
    fresh.transformer.load_lora_adapter(adapter, prefix="transformer", weight_name=ADAPTER)
    lora = [(n, m) for n, m in fresh.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert {n for n, _ in lora} == set(names)
    assert all(list(m.scaling.values()) == [scale] for _, m in lora)
    check_loaded_predict(fam, fresh, load_pipe(), adapter, x, "a red square", text_len)


def check_loaded_predict(fam, fresh, other, adapter, x, caption, text_len):
    """With TACA on, the family's predict at sigma 0.99 on latents x for the caption through ``fresh`` (a
    pipeline with the adapter loaded by diffusers) equals predict under taca.enable(other, lora=adapter)
    (to 1e-6; ``other`` a stock pipeline) and differs from other's stock predict."""
    sigma = torch.tensor([0.99])
    with torch.no_grad():
        cond = text_cond(fam, [caption], text_len)
        with taca.enabled(fresh.transformer, gamma=1.2):
            diffusers_loaded = fam.predict(fresh.transformer, x, sigma, cond, 1.0)
        stock = fam.predict(other.transformer, x, sigma, cond, 1.0)
        with taca.enabled(other, gamma=1.2, lora=adapter):
            taca_loaded = fam.predict(other.transformer, x, sigma, cond, 1.0)
    torch.testing.assert_close(taca_loaded, diffusers_loaded, rtol=0, atol=1e-6)
    assert not torch.allclose(taca_loaded, stock, atol=1e-5)


def check_adapter_gates_predict(load_pipe, adapter, res, text_len):
    """The family's predict at sigma 0.5 on a latent of res x res for "a red square": load_lora_weights
    changes it (the adapter always on) and the pipeline still runs; through taca.enable(lora=adapter)
    on a fresh pipeline the adapter is in and the pipeline runs, and at sigma 0.5 (gamma 1: the
    adapter gated off) predict is the stock model's, bit for bit."""
    from taca.train.families import family_for

    pipe = load_pipe()
    t = pipe.transformer
    fam = family_for(pipe)
    x = torch.randn(1, 4, res, res, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cond = text_cond(fam, ["a red square"], text_len)
        base = fam.predict(t, x, torch.tensor([0.5]), cond, 1.0)
        pipe.load_lora_weights(adapter)
        assert any("lora" in n for n, _ in t.named_parameters())
        assert not torch.allclose(fam.predict(t, x, torch.tensor([0.5]), cond, 1.0), base, atol=1e-6)
    call = dict(prompt="a red square", height=res, width=res, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=text_len, output_type="latent")
    assert torch.isfinite(pipe(generator=torch.Generator().manual_seed(0), **call).images).all()
    fresh = load_pipe()
    with taca.enabled(fresh, gamma=1.2, lora=adapter):
        assert any("lora" in n for n, _ in fresh.transformer.named_parameters())
        assert torch.isfinite(fresh(generator=torch.Generator().manual_seed(0), **call).images).all()
        with torch.no_grad():  # sigma 0.5: gamma 1, the adapter gated off -> the stock model
            assert torch.equal(fam.predict(fresh.transformer, x, torch.tensor([0.5]), cond, 1.0), base)


def check_lora_layers(transformer, prefix, sep, modules):
    """The transformer's LoRA parameters (after load_lora_weights) are all under prefix, inside sep,
    on exactly the modules named (the part after sep)."""
    lora = [n for n, _ in transformer.named_parameters() if "lora_" in n]
    assert lora and all(n.startswith(prefix) and sep in n for n in lora)
    assert {n.split(sep)[1].split(".lora_")[0] for n in lora} == modules
