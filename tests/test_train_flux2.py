"""taca train on tiny FLUX.2 pipelines (random weights, CPU, saved with save_pretrained): klein
(Flux2KleinPipeline: tiny Qwen3ForCausalLM + a tiny byte-level Qwen2 tokenizer) and dev
(Flux2Pipeline: tiny Mistral3ForConditionalGeneration; its tokenizer is a word-level fast tokenizer
with a Mistral-style chat template standing in for the PixtralProcessor, which needs torchvision).

Both are trained end to end (gamma in every joint attention call of every training forward, with
and without gradient checkpointing; the control LoRA runs stock attention); Flux2Family.predict is
checked against what each pipeline's own __call__ feeds its transformer (inputs, ids, timestep,
guidance, output and TACA's gamma); encode_images against the pipelines' batch-norm normalization
and their decode path; a caption's cache entry and prediction against its batch; the saved adapter
loads through diffusers and taca.enable. Reference images (edits): predict with two references
against each pipeline's __call__ with image=[...] (the references' tokens, ids and the cut output),
training on a JSONL of edits (gamma on, every forward carrying its line's references, one cache
entry per distinct image, the adapter loading), and the Klein-KV pipeline refusing references."""
import os
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

import taca  # noqa: E402
from taca.train import train  # noqa: E402
from taca.train.families import family_for  # noqa: E402
from taca.train.families.flux2 import Flux2Family  # noqa: E402
from train_checks import (check_batch_independent, check_taca_run, control_run, data_fixture,  # noqa: E402
                          GammaCounter, load, record_calls, record_forwards, train_config, write_data)

RES = 32  # 32x32 images: 2-level VAE (scale 2) -> 16x16 latents -> 2x2 patches -> 8x8 = 64 image tokens
TEXT_LEN = 40  # every prompt padded to 40 text tokens
# tests/test_models_flux2.py's tiny transformer; joint_attention_dim 24 = 3 stacked hidden states of 8
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=3.0,
            axes_dims_rope=(8, 8, 8, 8), rope_theta=2000)
N_JOINT = TINY["num_layers"] + TINY["num_single_layers"]
# FLUX.2-dev / klein scheduler_config.json
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
PROMPTS = ["a red square on a blue background", "a cat"]
# tiny models: one torch thread is faster than several (and than several fighting over shared cores)
pytestmark = pytest.mark.usefixtures("one_thread")


def _qwen_tokenizer():
    """A byte-level Qwen2 tokenizer: the 256 byte symbols, no merges, Qwen's special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[s] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], model_max_length=512,
                             extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def _mistral_tokenizer():
    """A word-level fast tokenizer with Mistral's chat specials and a template for the pipeline's
    [system, user] messages of {"type": "text"} parts (unknown words -> <unk>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from taca.demo import _vocab

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]
    vocab = {t: i for i, t in enumerate(specials + _vocab())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", model_max_length=512, extra_special_tokens=specials[4:])
    tok.chat_template = (
        "<s>{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% else %}[INST]{% endif %}"
        "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
        "{% if m['role'] == 'system' %}[/SYSTEM_PROMPT]{% else %}[/INST]{% endif %}{% endfor %}")
    return tok


def _vae():
    """AutoencoderKLFlux2, 2 levels, 4 latent channels (16 after 2x2 patches), non-trivial batch-norm stats."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    g = torch.Generator().manual_seed(5)
    vae.bn.running_mean.copy_(torch.randn(16, generator=g) * 0.3)
    vae.bn.running_var.copy_(torch.rand(16, generator=g) * 2 + 0.3)
    return vae.eval()


def build_klein(seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = _qwen_tokenizer()
    # 27 layers: the pipeline stacks hidden states (9, 18, 27)
    te = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=27,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                      max_position_embeddings=512, tie_word_embeddings=True)).eval()
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=_vae(), text_encoder=te,
                              tokenizer=tok, transformer=Flux2Transformer2DModel(**TINY, guidance_embeds=False).eval(),
                              is_distilled=False)


def build_dev(seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    tok = _mistral_tokenizer()
    n = len(tok)
    # 30 text layers: the pipeline stacks hidden states (10, 20, 30)
    te = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(vocab_size=n, hidden_size=8, intermediate_size=16, num_hidden_layers=30,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                  max_position_embeddings=512),
        vision_config=PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=16, patch_size=4, head_dim=4),
        image_token_index=n - 1)).eval()
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=_vae(), text_encoder=te,
                         tokenizer=tok, transformer=Flux2Transformer2DModel(**TINY, guidance_embeds=True).eval())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    build_klein().save_pretrained(str(root / "klein"))
    build_dev().save_pretrained(str(root / "dev"))
    return {"klein": str(root / "klein"), "dev": str(root / "dev")}


data = data_fixture(8)
_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,gc", [("klein", False), ("dev", False), ("klein", True)])
def test_gamma_on_in_every_training_forward(kind, gc, models, data, tmp_path, monkeypatch):
    from taca.train.data import Cache

    gammas = GammaCounter(monkeypatch).gammas
    res = train(_cfg(models[kind], data, tmp_path / "out", gradient_checkpointing=gc), progress=False)
    # every joint attention (2 double- + 2 single-stream) of every training forward had gamma 1.2;
    # with gradient checkpointing each block's forward runs again in the backward, with its gamma
    check_taca_run(res, gammas, 3 * N_JOINT * (2 if gc else 1))
    # the cache: patchified latents (16, 8, 8); prompt embeddings padded to TEXT_LEN, nothing else
    cache = tmp_path / "out" / "cache"
    lat = Cache.read(str(next((cache / "latents").iterdir())))
    txt = Cache.read(str(next((cache / "text").iterdir())))
    assert lat["latents"].shape == (16, RES // 4, RES // 4)
    assert set(txt) == {"prompt_embeds"} and txt["prompt_embeds"].shape == (TEXT_LEN, 24)
    # "attn": both streams' joint-attention projections and the single blocks' fused ones; no feed-forward
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors")).keys()
    assert any(".attn.to_qkv_mlp_proj.lora_A" in k for k in keys)
    assert any("single_transformer_blocks.1.attn.to_out.lora_A" in k for k in keys)
    assert any("transformer_blocks.0.attn.to_out.0.lora_A" in k for k in keys)
    assert any("transformer_blocks.0.attn.add_k_proj.lora_A" in k for k in keys)
    assert any("transformer_blocks.0.attn.to_add_out.lora_A" in k for k in keys)
    assert not any(".ff." in k or ".ff_context." in k for k in keys)


def test_control_lora_runs_stock_attention(models, data, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, models["klein"], data), tmp_path / "out", monkeypatch, max_steps=2)
    assert res.steps == 2
    assert os.path.isfile(tmp_path / "out" / "pytorch_lora_weights.safetensors")


# ---------------------------------------------------------------------------------------------


def _check_same_call(kind, kw_p, out_p, kw_f, out_f):
    """The family's transformer call (kw_f, out_f) is the pipeline's (kw_p, out_p), bit for bit: the
    timestep (float32), tokens, text, ids, the guidance (dev: 2.5; klein: none) and the output."""
    assert kw_f["timestep"].dtype == torch.float32 and torch.equal(kw_f["timestep"], kw_p["timestep"])
    for k in ("hidden_states", "encoder_hidden_states", "txt_ids", "img_ids"):
        assert kw_f[k].dtype == kw_p[k].dtype and torch.equal(kw_f[k], kw_p[k]), k
    if kind == "dev":
        assert torch.equal(kw_f["guidance"], kw_p["guidance"]) and float(kw_f["guidance"][0]) == 2.5
    else:
        assert kw_p["guidance"] is None and kw_f["guidance"] is None
    assert torch.equal(out_f, out_p)

@pytest.mark.parametrize("kind", ["klein", "dev"])
def test_predict_is_the_pipelines_transformer_call(kind, models):
    """The pipeline's own __call__ (2 steps: t = 1000 in the window, then one outside it) records
    every transformer call; Flux2Family.predict on the same latents (unpacked with the pipeline's
    _unpack_latents_with_ids), sigma = the passed timestep, and the prompt encoded by
    encode_text makes the same call: identical hidden states, timestep, guidance, ids and text,
    the same output, and the same TACA gamma (through the timestep kwarg vs the pipeline's
    _current_timestep)."""
    from diffusers import Flux2Pipeline

    pipe = load(models[kind])
    fam = family_for(pipe)
    assert isinstance(fam, Flux2Family) and fam.shift() == 1.0
    guidance_scale = 1.0 if kind == "klein" else 2.5  # klein: no true CFG (one call per step)
    t = pipe.transformer
    calls, hook = record_calls(t)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        pipe(prompt=PROMPTS, height=RES, width=RES, num_inference_steps=2, guidance_scale=guidance_scale,
             max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(0), output_type="latent")
        n_pipe = len(calls)
        enc = fam.encode_text(PROMPTS, torch.device("cpu"), TEXT_LEN)
        preds = []
        for kw, _, _ in calls[:n_pipe]:
            noisy = Flux2Pipeline._unpack_latents_with_ids(kw["hidden_states"], kw["img_ids"])
            assert noisy.shape == (2, 16, RES // 4, RES // 4)
            preds.append(fam.predict(t, noisy, kw["timestep"], enc, guidance_scale))
    hook.remove()
    assert n_pipe == 2 and len(calls) == 4
    gammas = []
    for (kw_p, out_p, g_p), (kw_f, out_f, g_f) in zip(calls[:2], calls[2:]):
        _check_same_call(kind, kw_p, out_p, kw_f, out_f)
        assert (g_p is None) == (g_f is None) and (g_p is None or torch.equal(g_p, g_f))
        gammas.append(None if g_p is None else g_p.tolist())
    assert gammas == [[pytest.approx(1.2)] * 2, None]  # step 0 (sigma 1) in the window, step 1 out
    # the returned velocity: the pipeline's transformer output, unpacked with its own helper
    for pred, (kw, out, _) in zip(preds, calls[:2]):
        assert torch.equal(pred, Flux2Pipeline._unpack_latents_with_ids(out, kw["img_ids"]))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["klein", "dev"])
def test_latents_invert_the_pipelines_normalization(kind, models):
    """encode_images = the pipelines' own _encode_vae_image (posterior mode, 2x2 patches, batch-
    norm running stats), with non-trivial stats; the decode path's inverse (x std + mean, then
    _unpatchify_latents) gives back the VAE's latents; for klein through the pipeline's __call__
    itself (output_type="latent" returns the denormalized latents), the scheduler step held fixed."""
    pipe = load(models[kind])
    fam = family_for(pipe)
    vae = pipe.vae
    assert vae.bn.running_mean.abs().min() > 0 and not torch.allclose(vae.bn.running_var, torch.ones(16))
    px = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = fam.encode_images(px)
    assert lat.shape == (2, 16, RES // 4, RES // 4)
    with torch.no_grad():
        mode = vae.encode(px).latent_dist.mode()
        assert torch.equal(lat, pipe._encode_vae_image(px, generator=None))
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    torch.testing.assert_close(pipe._unpatchify_latents(lat * std + mean), mode, rtol=1e-5, atol=1e-6)
    if kind == "klein":
        pipe.scheduler.step = lambda noise_pred, t, latents, return_dict=False: (latents,)
        out = pipe(prompt=PROMPTS, height=RES, width=RES, num_inference_steps=1, guidance_scale=1.0,
                   max_sequence_length=TEXT_LEN, latents=lat, output_type="latent").images
        torch.testing.assert_close(out, mode, rtol=1e-5, atol=1e-6)


def test_odd_latents_are_refused(models):
    fam = family_for(load(models["klein"]))
    with pytest.raises(ValueError, match="even height and width"):
        fam.encode_images(torch.zeros(1, 3, 34, 34))  # 17x17 latents


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["klein", "dev"])
def test_a_caption_does_not_depend_on_its_batch(kind, models):
    """The pipelines pad every prompt to max_sequence_length (no mask reaches the transformer):
    a caption's cache entry is the same alone or next to a longer one, and predict on the
    collated batch equals predict on each caption alone."""
    pipe = load(models[kind])
    fam = family_for(pipe)
    cpu = torch.device("cpu")
    long_, short = "a red square on a blue background with a green circle", "a cat"
    both = fam.split_text(fam.encode_text([long_, short], cpu, TEXT_LEN))
    alone = fam.split_text(fam.encode_text([short], cpu, TEXT_LEN))
    assert [e["prompt_embeds"].shape for e in both] == [(TEXT_LEN, 24)] * 2
    torch.testing.assert_close(both[1]["prompt_embeds"], alone[0]["prompt_embeds"], rtol=1e-5, atol=1e-6)
    assert fam.split_text(fam.encode_text([short], cpu, None))[0]["prompt_embeds"].shape == (512, 24)  # default
    noisy = torch.randn(2, 16, RES // 4, RES // 4, generator=torch.Generator().manual_seed(2))
    check_batch_independent(fam, pipe.transformer, noisy, torch.tensor([0.99, 0.5]), both, 3.5)


# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # "attn" then "attn+ff" on one skeleton
def test_targets_match_the_real_configs():
    """"attn" / "attn+ff" name Linear layers of FLUX.2-dev (diffusers' default config) and
    FLUX.2-klein-4B (5 + 20 blocks, 24 heads, Qwen3-4B's 3 x 2560 text features), built on the
    meta device: both streams' projections of the double-stream blocks (the scripts' default list
    plus the text stream's four), the single-stream to_out per block, never the double-stream
    blocks' to_out ModuleList."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    class _P:  # what Flux2Family reads from a pipeline
        def __init__(self, t):
            self.transformer = t
            self.scheduler = type("S", (), {"config": {"use_dynamic_shifting": False, "shift": 3.0}})()

    for kw, n_double, n_single in [({}, 8, 48), (dict(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                                       joint_attention_dim=7680, guidance_embeds=False), 5, 20)]:
        with init_empty_weights():
            t = Flux2Transformer2DModel(**kw)
        fam = Flux2Family(_P(t))
        assert fam.shift() == 3.0  # a static shift is taken from the scheduler (FLUX.2's is dynamic: 1)
        linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
        for spec, per_double, per_single in (("attn", 8, 2), ("attn+ff", 12, 2)):
            targets = fam.target_modules(spec)
            hit = {n for n in linear if any(n == x or n.endswith("." + x) for x in targets)}
            assert all(any(n == x or n.endswith("." + x) for n in linear) for x in targets)
            assert len(hit) == per_double * n_double + per_single * n_single
            assert sum("add_" in n or "to_add_out" in n for n in hit) == 4 * n_double
            inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), t, adapter_name=spec.replace("+", "_"),
                                     low_cpu_mem_usage=True)
        assert fam.target_modules(["attn.add_k_proj"]) == ["attn.add_k_proj"]


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["klein", "dev"])
def test_adapter_loads_in_its_pipeline(kind, models, data, tmp_path):
    res = train(_cfg(models[kind], data, tmp_path / "out", max_steps=2, lr=1e-2), progress=False)
    pipe = load(models[kind])
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, RES // 4, RES // 4, generator=g)
    fam = family_for(pipe)
    cond = fam.encode_text(["a red square"], torch.device("cpu"), TEXT_LEN)

    def velocity(s):
        return fam.predict(t, noisy, torch.tensor([s]), cond, 3.5)

    with torch.no_grad():
        stock = {s: velocity(s) for s in (0.5, 1.0)}
        with taca.enabled(pipe, gamma=1.2):
            taca_only = velocity(1.0)
        with taca.enabled(pipe, gamma=1.2, lora=res.out):
            with_lora = {s: velocity(s) for s in (0.5, 1.0)}
            call = dict(prompt="a red square", height=RES, width=RES, num_inference_steps=2,
                        max_sequence_length=TEXT_LEN, output_type="latent", guidance_scale=1.0)
            lat = pipe(generator=torch.Generator().manual_seed(0), **call).images
            assert torch.isfinite(lat).all()
        assert torch.equal(with_lora[0.5], stock[0.5])  # gamma 1: the stock model, adapter off
        assert not torch.allclose(with_lora[1.0], taca_only, atol=1e-5)  # gamma on: the adapter acts
        assert torch.equal(velocity(1.0), stock[1.0])  # disable restores
        assert not any("lora" in n for n in t.state_dict())
        # diffusers' own loader takes the file as is (the adapter always on)
        pipe.load_lora_weights(res.out, adapter_name="mine")
        assert any("lora_A" in n for n in t.state_dict())
        assert not torch.allclose(velocity(0.5), stock[0.5], atol=1e-5)
        lat2 = pipe(generator=torch.Generator().manual_seed(0), **call).images
        assert torch.isfinite(lat2).all() and not torch.equal(lat2, lat)


# --- reference images (edits) -----------------------------------------------------------------
N_TOKENS = (RES // 4) ** 2  # a target's image tokens
# the pipelines' image processor refuses a reference under 64 px a side; a 64 x 64 one it takes as
# it is (no resize, no crop), and keeps at its own size next to a RES x RES target
REF_RES = 64
N_REF = (REF_RES // 4) ** 2


def _noise_pngs(folder, n, seed=0):
    """n REF_RES x REF_RES PNGs of uniform random RGB noise; their paths."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [os.path.join(folder, f"ref{i}.png") for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (REF_RES, REF_RES, 3), dtype=np.uint8)).save(p)
    return paths


@pytest.mark.parametrize("kind", ["klein", "dev"])
def test_predict_with_references_is_the_pipelines_call(kind, models, tmp_path):
    """The pipeline's own __call__ (a RES x RES target) with image=[ref0, ref1] (REF_RES x REF_RES
    PNGs, the smallest it takes: its preprocessing is taca's load_image, bit for bit; the references
    keep their size, as in the pipeline) records its first transformer call (sigma 1, TACA on);
    Flux2Family.predict on the target's latents (the first h w tokens, unpacked), the same sigma and
    cond = prompt_embeds + reference_latents (encode_images of each reference alone, stacked (B, R,
    C, h, w); training's load_image + encode_images give them to 1e-5) makes the same call:
    identical hidden states (the references' tokens appended in order), ids (t = 0, 10, 20), text,
    timestep, guidance and gamma, the same output, and returns the pipeline's noise_pred (its first
    h w tokens) unpacked. Another second reference, the two swapped, or none at all change the
    prediction."""
    from diffusers import Flux2Pipeline
    from PIL import Image

    from taca.train.data import load_image

    paths = _noise_pngs(tmp_path, 3)  # two references and another image in place of the second
    images = [Image.open(p).convert("RGB") for p in paths]
    pipe = load(models[kind])
    fam = family_for(pipe)
    # the pipeline's preprocessing: load_image's pixels bit for bit, in a channels-last layout
    # (numpy's HWC permuted), in which the VAE's convolutions round differently (~1e-6) from
    # load_image's contiguous tensor: the exact comparison encodes the pipeline's own tensor
    px = [pipe.image_processor.preprocess(im, height=REF_RES, width=REF_RES, resize_mode="crop") for im in images]
    for p, x in zip(paths, px):
        assert torch.equal(x[0], load_image(p, REF_RES))
    guidance_scale = 1.0 if kind == "klein" else 2.5
    t = pipe.transformer
    calls, hook = record_calls(t)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        pipe(prompt=PROMPTS, image=images[:2], height=RES, width=RES, num_inference_steps=1,
             guidance_scale=guidance_scale, max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(0),
             output_type="latent")
        assert len(calls) == 1
        kw_p, out_p, g_p = calls[0]
        ids = kw_p["img_ids"]
        n_all = N_TOKENS + 2 * N_REF
        assert kw_p["hidden_states"].shape == (2, n_all, 16) and out_p.shape == (2, n_all, 16)
        starts = [0, N_TOKENS, N_TOKENS + N_REF, n_all]
        assert all((ids[:, a:b, 0] == 10 * i).all() for i, (a, b) in enumerate(zip(starts, starts[1:])))
        noisy = Flux2Pipeline._unpack_latents_with_ids(kw_p["hidden_states"][:, :N_TOKENS], ids[:, :N_TOKENS])
        assert noisy.shape == (2, 16, RES // 4, RES // 4)
        lat = [fam.encode_images(x) for x in px]  # (1, 16, 16, 16) each, as the pipeline encodes them
        for p, x in zip(paths, lat):  # what training caches (load_image, encode_images)
            # the same pixels bit for bit (asserted above), only their memory layout differs: the encoder's
            # float32 sums run in another order, a few units in the last place of the output's scale (up to
            # 6 ulps, 1.2e-6 at |x| <= 1.8, with numpy 2.4.6 / pillow 13.0.0; an absolute 1e-6 here failed on
            # that). 16 ulps of the scale, where one pixel moved by one 8-bit level changes it by ~7e-4.
            scale = x.abs().max().item()
            torch.testing.assert_close(fam.encode_images(load_image(p, REF_RES)[None]), x, rtol=0,
                                       atol=16 * torch.finfo(torch.float32).eps * scale)
        enc = fam.encode_text(PROMPTS, torch.device("cpu"), TEXT_LEN)

        def predict(*refs):
            cond = dict(enc)
            if refs:  # the same references for both prompts: (2, R, 16, 16, 16)
                cond["reference_latents"] = torch.stack([lat[r] for r in refs], 1).expand(2, -1, -1, -1, -1)
            return fam.predict(t, noisy, kw_p["timestep"], cond, guidance_scale)

        pred = predict(0, 1)
        assert len(calls) == 2
        kw_f, out_f, g_f = calls[1]
        others = [predict(0, 2), predict(1, 0), predict()]
    hook.remove()
    _check_same_call(kind, kw_p, out_p, kw_f, out_f)
    assert g_p is not None and torch.equal(g_f, g_p) and g_p.tolist() == [pytest.approx(1.2)] * 2
    assert torch.equal(pred, Flux2Pipeline._unpack_latents_with_ids(out_p[:, :N_TOKENS], ids[:, :N_TOKENS]))
    for other in others:  # another second reference; the two swapped; no reference
        assert other.shape == pred.shape and not torch.allclose(other, pred, atol=1e-5)


# what each JSONL line of the edits data set gives: (target, [reference, reference]); img00 is the
# target of the first line and a reference of the third: one image, one cache entry
EDITS = [(0, [4, 5]), (1, [5, 4]), (2, [0, 4]), (3, [4, 1])]


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """<tmp>/edits.jsonl: the EDITS lines over write_data's 6 images (32 to 47 px a side, not
    square: load_image resizes and crops targets and references alike) with their captions (four
    distinct ones); gives (the file, [(target path, [reference paths], caption)] in line order)."""
    import json

    folder = tmp_path_factory.mktemp("edits")
    write_data(folder, n=6)
    name = [f"img{i:02d}.png" for i in range(6)]
    rows = []
    with open(folder / "edits.jsonl", "w") as f:
        for tgt, refs in EDITS:
            caption = (folder / f"img{tgt:02d}.txt").read_text()
            f.write(json.dumps({"image": name[tgt], "references": [name[r] for r in refs], "caption": caption}) + "\n")
            rows.append((str(folder / name[tgt]), [str(folder / name[r]) for r in refs], caption))
    assert len({c for _, _, c in rows}) == 4
    return str(folder / "edits.jsonl"), rows


@pytest.mark.parametrize("kind", ["klein", "dev"])
def test_training_with_references(kind, models, edits, tmp_path, monkeypatch):
    """taca train on the edits JSONL (two references per line): gamma 1.2 in every joint attention
    of every training forward; every forward feeds the transformer the target's tokens and both
    references' (3 x N_TOKENS, ids t = 0, 10, 20), each row's reference tokens the cached latents of
    its own line's references in order (the line found by its caption's embeddings); the cache holds
    one latent entry per distinct image (6: the targets and references, img00 being both) and one
    text entry per caption; the saved adapter loads through diffusers' load_lora_weights and changes
    predict with references, and the pipeline still runs with image=[...]."""
    from diffusers import Flux2Pipeline
    from PIL import Image

    from taca.train.data import Cache, file_sha256, text_sha256

    jsonl, rows = edits
    gammas = GammaCounter(monkeypatch).gammas
    from diffusers import Flux2Transformer2DModel

    forwards = record_forwards(monkeypatch, Flux2Transformer2DModel,
                               ("hidden_states", "img_ids", "encoder_hidden_states"))
    res = train(_cfg(models[kind], jsonl, tmp_path / "out", lr=1e-2), progress=False)
    monkeypatch.undo()
    check_taca_run(res, gammas, 3 * N_JOINT)

    cache = tmp_path / "out" / "cache"

    def entry(sub, sha):  # the cache file of a sha256 (named <sha[:32]>-<key>.safetensors)
        (path,) = [p for p in (cache / sub).iterdir() if p.name.startswith(sha[:32])]
        return Cache.read(str(path))

    images = {p for tgt, refs, _ in rows for p in [tgt] + refs}
    assert len(images) == 6 and len({file_sha256(p) for p in images}) == 6
    assert sorted(p.name[:32] for p in (cache / "latents").iterdir()) == sorted(file_sha256(p)[:32] for p in images)
    assert len(list((cache / "text").iterdir())) == 4
    texts = [entry("text", text_sha256(c))["prompt_embeds"] for _, _, c in rows]
    refs = [[Flux2Pipeline._pack_latents(entry("latents", file_sha256(r))["latents"][None])[0] for r in rr]
            for _, rr, _ in rows]
    assert all(r.shape == (N_TOKENS, 16) for rr in refs for r in rr)

    assert len(forwards) == 3
    seen = set()
    for kw in forwards:
        assert kw["hidden_states"].shape == (2, 3 * N_TOKENS, 16) and kw["img_ids"].shape == (2, 3 * N_TOKENS, 4)
        for i in range(3):
            assert (kw["img_ids"][:, i * N_TOKENS:(i + 1) * N_TOKENS, 0] == 10 * i).all()
        for b in range(2):
            (line,) = [j for j, e in enumerate(texts) if torch.equal(kw["encoder_hidden_states"][b], e)]
            seen.add(line)
            for i, r in enumerate(refs[line]):
                assert torch.equal(kw["hidden_states"][b, (i + 1) * N_TOKENS:(i + 2) * N_TOKENS], r), (line, i)
    assert len(seen) > 1

    # the adapter: diffusers' loader takes the file; predict with the references moves; the pipeline runs
    pipe = load(models[kind])
    fam = family_for(pipe)
    t = pipe.transformer
    cond = {"prompt_embeds": texts[0][None],
            "reference_latents": torch.stack([entry("latents", file_sha256(r))["latents"] for r in rows[0][1]])[None]}
    noisy = torch.randn(1, 16, RES // 4, RES // 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = fam.predict(t, noisy, torch.tensor([0.5]), cond, 3.5)
        pipe.load_lora_weights(res.out, adapter_name="mine")
        assert any("lora_A" in n for n in t.state_dict())
        assert not torch.allclose(fam.predict(t, noisy, torch.tensor([0.5]), cond, 3.5), stock, atol=1e-5)
        ref_images = [Image.open(p).convert("RGB").resize((REF_RES, REF_RES)) for p in rows[0][1]]
        lat = pipe(prompt=rows[0][2], image=ref_images, height=RES, width=RES, num_inference_steps=2,
                   guidance_scale=1.0, max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    assert lat.numel() == 4 * (RES // 2) ** 2 and torch.isfinite(lat).all()  # klein unpacks them, dev not


def test_klein_kv_takes_no_references(models, edits, tmp_path):
    """Flux2Pipeline and Flux2KleinPipeline take any number of references; the Klein-KV pipeline
    (its references go through its K/V cache, which is not trained) none: check_references and
    train on the edits data with a Flux2KleinKVPipeline (the klein components) raise ConfigError
    naming --data, before a step runs."""
    from diffusers import Flux2KleinKVPipeline

    from taca.train import ConfigError
    from taca.train.families import check_references

    for cls in ("Flux2Pipeline", "Flux2KleinPipeline"):
        check_references(Flux2Family, cls, 2)
    check_references(Flux2Family, "Flux2KleinKVPipeline", 0)
    msg = "argument --data: Flux2KleinKVPipeline takes no reference images, and the data gives {} per sample"
    with pytest.raises(ConfigError, match=msg.format(1)):
        check_references(Flux2Family, "Flux2KleinKVPipeline", 1)
    kv = Flux2KleinKVPipeline(**load(models["klein"]).components)
    with pytest.raises(ConfigError, match=msg.format(2)):
        train(_cfg(models["klein"], edits[0], tmp_path / "out"), pipeline=kv, progress=False)
    assert not os.path.exists(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert not os.path.exists(tmp_path / "out" / "cache")
