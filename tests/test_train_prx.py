"""taca train on a tiny PRXPipeline (a 2-layer T5GemmaEncoder with the demo's word-level T5 tokenizer,
a 2-level AutoencoderKL with the FLUX VAE's shift and scale, tests/test_models_prx.py's 2-block
PRXTransformer2DModel with its zero-initialized layers randomized, a static-shift-3 scheduler), saved
with save_pretrained, random weights, CPU: gamma in every attention call of every training forward
(with and without gradient checkpointing, which trains the same adapter), the control run stock; the
family's predict is the pipeline's own transformer call (unpatched latents, float32 timestep
t / 1000, the fixed-length embeddings and their bool mask, the output as it is; with and without
CFG's batch) and Euler steps with it land on the pipeline's result under the shift training uses;
the latents are what the pipeline decodes (FLUX-style AutoencoderKL and DC-AE); captions padded to
the fixed length with the pipeline's mask, independent of their batch (and, masked, of the length);
bad input, schedulers, PRXPixelPipeline and a VAE-less pipeline refused; the adapter loads through
the transformer's load_lora_adapter and taca.enable(pipe.transformer, lora=) once lora_support gave
the transformer diffusers' PEFT mixin (PRXTransformer2DModel has none in diffusers 0.42.1, and the
pipeline's load_lora_weights is StableDiffusion's, for a UNet).

Offline stand-ins: ftfy (which PRXPipeline cleans every prompt with) is not installed here, so an
identity ``fix_text`` is put in pipeline_prx's namespace (the test captions are plain ASCII, which
ftfy leaves as they are); and diffusers' ``transformers.T5GemmaEncoder`` shim (which
DiffusionPipeline.from_pretrained resolves the text encoder through) is set on the transformers
module in sys.modules where it was lost (it is when PRXPipeline is the first thing imported: see
_shims)."""
import sys
import types
from functools import partial
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

import taca  # noqa: E402
import taca.pipeline  # noqa: E402
from taca.train import train  # noqa: E402
from taca.train.config import ConfigError  # noqa: E402

from test_models_prx import TINY, _transformer  # noqa: E402  (the adapter tests' tiny transformer)
from train_checks import (ADAPTER, cache_dir, cached_text, check_batch_independent,  # noqa: E402,F401
                          check_same_adapter, check_taca_run, check_zero_model_decodes, checked_family,
                          checkpointed_run, control_run, data_fixture, load, LONG, peft_hits, record_calls, RUN_FILES,
                          run_fixture, saved_lora_modules, SHORT, text_cond, train_config)

RES = 32  # 32x32 images -> 16x16 latents (2-level VAE) -> 2x2 patches -> 64 image tokens
TEXT_LEN = 16  # every caption padded to 16 tokens, with the mask
TEXT_DIM = TINY["context_in_dim"]  # 24
N_BLOCKS = TINY["depth"]  # every block has one attention (image queries, [text, image] keys)
SHIFT = 3.0  # the PRX checkpoints' scheduler config is not known offline: a static shift, as test_models_prx
_ATTN = ("attention.img_qkv_proj", "attention.txt_kv_proj", "attention.to_out.0")
_FF = ("gate_proj", "up_proj", "down_proj")
MASK = "prompt_attention_mask"


@pytest.fixture(scope="module", autouse=True)
def _shims():
    """ftfy's fix_text as the identity where ftfy is not installed; diffusers' T5GemmaEncoder shim
    on the transformers module in sys.modules (diffusers.pipelines.prx sets it on the module object it
    imported, which transformers 5.x replaces in sys.modules while importing modeling_t5gemma)."""
    import diffusers.pipelines.prx as prx_pkg
    import diffusers.pipelines.prx.pipeline_prx as pp

    undo = []
    if not hasattr(pp, "ftfy"):
        pp.ftfy = types.SimpleNamespace(fix_text=lambda s: s)
        undo.append(lambda: delattr(pp, "ftfy"))
    tr = sys.modules["transformers"]
    if not hasattr(tr, "T5GemmaEncoder"):
        tr.T5GemmaEncoder = prx_pkg.T5GemmaEncoder
        undo.append(lambda: delattr(tr, "T5GemmaEncoder"))
    yield
    for f in undo:
        f()


def _t5gemma_config(vocab):
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

    cfg = T5GemmaModuleConfig(vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=12, query_pre_attn_scalar=12,
                              sliding_window=8, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                              bos_token_id=2)
    cfg.dropout_rate = 0.0
    return cfg


def _vae(shift=0.1159, scale=0.3611):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=RES, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale).eval()


def _dc_vae():
    from diffusers import AutoencoderDC

    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8,
                         encoder_block_types=("ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
                         decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                         decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
                         decoder_qkv_multiscales=((), (5,)), scaling_factor=0.41407).eval()


def build_pipeline(seed=0, vae="kl"):
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    from taca.demo import _t5_tokenizer

    tok, vocab = _t5_tokenizer()
    torch.manual_seed(seed)
    te = T5GemmaEncoder(_t5gemma_config(vocab)).eval()
    pipe = PRXPipeline(transformer=_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
                       text_encoder=te, tokenizer=tok, vae=_vae() if vae == "kl" else _dc_vae())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """build_pipeline() saved with save_pretrained; the text encoder's config written as the composite
    T5GemmaConfig (encoder = the tiny module config) that diffusers' T5GemmaEncoder.from_pretrained reads
    its config.encoder from, as the hub checkpoints hold it."""
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaConfig

    d = tmp_path_factory.mktemp("models") / "prx"
    pipe = build_pipeline()
    pipe.save_pretrained(str(d))
    enc = pipe.text_encoder.config.to_dict()
    composite = T5GemmaConfig(encoder=enc, decoder=enc, vocab_size=enc["vocab_size"])
    composite.architectures = ["T5GemmaEncoder"]
    composite.save_pretrained(str(d / "text_encoder"))
    return str(d)


def _load(model):
    pipe = load(model)
    assert type(pipe).__name__ == "PRXPipeline" and pipe.text_encoder.config.hidden_size == TEXT_DIM
    return pipe


def _family(pipe):
    from taca.train.families.prx import PRXFamily

    return checked_family(pipe, PRXFamily, "prx")


def _attn_names(n):
    return {f"blocks.{i}.{p}" for i in range(n) for p in _ATTN}


def _ff_names(n):
    return {f"blocks.{i}.{p}" for i in range(n) for p in _FF}




def _call(**kw):
    """PRXPipeline call arguments: no resolution binning (it would resize to the 512 bin), TEXT_LEN tokens."""
    return dict(dict(height=RES, width=RES, use_resolution_binning=False, tokenizer_max_length=TEXT_LEN,
                     guidance_scale=1.0, num_inference_steps=2, output_type="latent"), **kw)


# alpha 8 at rank 4: loading the adapter back must read the scale from the file's metadata
_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN, alpha=8.0)
data = data_fixture(4)
trained = run_fixture(lambda model, data, cache_dir, out: train(_cfg(model, data, out, cache_dir=cache_dir),
                                                               progress=False),
                      where=("runs", "taca"))  # one TACA run, kept for the adapter tests


def test_family_and_targets(model):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from taca.models import adapter_class
    from taca.train.families.prx import PRXFamily

    pipe = _load(model)
    assert adapter_class(pipe.transformer).name == "prx"
    assert not hasattr(pipe.transformer, "add_adapter")  # diffusers 0.42.1: no PeftAdapterMixin
    fam = _family(pipe)
    # the family gave the transformer diffusers' LoRA API (the loop calls add_adapter); still the PRX adapter
    assert callable(pipe.transformer.add_adapter) and callable(pipe.transformer.load_lora_adapter)
    assert type(pipe.transformer).__name__ == "PRXTransformer2DModel"
    assert adapter_class(pipe.transformer).name == "prx"
    assert fam.shift() == SHIFT  # the scheduler's static shift, which set_timesteps applies (no mu)
    assert callable(fam.lora_saver().save_lora_weights) and fam.lora_saver().__name__ == "FluxPipeline"
    assert fam.text_modules() == [pipe.text_encoder] and fam.image_modules() == [pipe.vae]
    linear = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == _attn_names(N_BLOCKS)
    assert peft_hits(linear, fam.target_modules("attn+ff")) - attn == _ff_names(N_BLOCKS)
    assert fam.target_modules(["to_out.0"]) == ["to_out.0"]
    assert PRXFamily(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))).shift() == 1.0


def test_targets_on_the_real_config():
    """PRXTransformer2DModel's own defaults (16 blocks, hidden 1792, 28 heads, text dim 2304, 16 latent
    channels: the FLUX VAE's; the hub's configs cannot be read offline), built empty: "attn" hits exactly
    every block's image q / k / v, text k / v and output projections, "attn+ff" adds the blocks' MLPs."""
    from accelerate import init_empty_weights
    from diffusers import PRXTransformer2DModel

    from taca.train.families.prx import PRXFamily

    with init_empty_weights():
        t = PRXTransformer2DModel()
    assert (t.config.depth, t.config.hidden_size, t.config.context_in_dim) == (16, 1792, 2304)
    fam = PRXFamily(SimpleNamespace(scheduler=None, transformer=t))
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == _attn_names(16) and len(attn) == 16 * 3
    assert peft_hits(linear, fam.target_modules("attn+ff")) - attn == _ff_names(16)
    assert all(peft_hits(linear, [k]) for k in fam.target_modules("attn+ff"))  # no dead name
    assert t.get_submodule("blocks.0.attention.txt_kv_proj").in_features == 1792  # the projected text


def test_gamma_on_in_every_training_forward(trained):
    res, calls = trained
    # every attention of every forward: 3 steps x 2 blocks, each gamma 1.2 for both samples
    check_taca_run(res, calls, 3 * N_BLOCKS, files=RUN_FILES[:3])
    assert saved_lora_modules(res.out) == {f"transformer.{n}" for n in _attn_names(N_BLOCKS)}
    # the cache holds each caption at the fixed length with its bool mask
    entries = cached_text(res)
    assert entries and all(set(e) == {"prompt_embeds", MASK} for e in entries)
    assert all(e["prompt_embeds"].shape == (TEXT_LEN, TEXT_DIM) and e[MASK].dtype == torch.bool
               and e[MASK].shape == (TEXT_LEN,) for e in entries)


def test_gradient_checkpointing_recomputes_taca(trained, model, data, cache_dir, tmp_path, monkeypatch):
    """With checkpointing every block runs twice per step (forward, recompute in the backward), both
    times with gamma; the gradients are the same, so the losses and the adapter are too."""
    res = checkpointed_run(partial(_cfg, model, data, cache_dir=cache_dir), trained[0], tmp_path / "out", monkeypatch,
                           2 * 3 * N_BLOCKS)
    check_same_adapter(trained[0].out, res.out)


def test_control_runs_stock_attention(model, data, cache_dir, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data, cache_dir=cache_dir), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2




def timesteps_off(sch, i):
    """Whether the pipeline's timestep at step i, the scheduler's t / 1000, is not its sigma bit for bit."""
    return not torch.equal((sch.timesteps[i].float() / 1000).view(1), sch.sigmas[i].view(1))


_KEYS = ("hidden_states", "timestep", "encoder_hidden_states", "attention_mask")


def _same_call(kw, pkw):
    assert set(kw) == set(pkw) == set(_KEYS) | {"return_dict"}
    for k in _KEYS:
        assert kw[k].dtype == pkw[k].dtype and torch.equal(kw[k], pkw[k]), k


def test_predict_is_the_pipelines_denoising_step(model):
    """PRXPipeline's own loop (3 steps, no CFG, one prompt, a non-square 32x48 image, TACA on) with its
    static-shift-3 scheduler: the transformer call predict makes on the pipeline's latents at the
    scheduler's sigma with the cached text is the pipeline's call bit for bit (the same unpatched
    latents, float32 timestep t / 1000, embeddings and bool mask, no other argument), its output the
    pipeline's, not negated, and Euler steps with it land on the pipeline's result; gamma 1.2 at sigma 1
    only, on both paths. With CFG the pipeline's batch is [negative "", prompt] encoded together: the
    family's entries for ["", prompt] are that batch and predict on it is the pipeline's call. With two
    prompts the pipeline passes one timestep (1,) for the batch: predict's per-sample one gives its
    output. At a sigma whose t / 1000 is an ulp off (one of 14 steps), predict still passes the
    pipeline's timestep."""
    pipe = _load(model)
    fam = _family(pipe)
    t = pipe.transformer
    H, W = 32, 48
    h, w = H // pipe.vae_scale_factor, W // pipe.vae_scale_factor
    assert (h, w) == (16, 24)
    x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(3))
    calls, hook = record_calls(t)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        out = pipe(prompt=SHORT, latents=x, **_call(height=H, width=W, num_inference_steps=3)).images
        seen = list(calls)
        assert len(seen) == 3
        sigmas, timesteps = pipe.scheduler.sigmas, pipe.scheduler.timesteps
        sch = pipe.scheduler  # set_timesteps(3) without mu: its linspace grid, shifted by the static shift
        s0 = torch.linspace(sch._sigma_to_t(sch.sigma_max), sch._sigma_to_t(sch.sigma_min), 3,
                            dtype=torch.float64) / 1000
        torch.testing.assert_close(sigmas[:-1], (SHIFT * s0 / (1 + (SHIFT - 1) * s0)).float(), rtol=0, atol=1e-6)
        cond = text_cond(fam, [SHORT], TEXT_LEN)
        for i in range(3):
            pkw, pipe_out, pg = seen[i]
            torch.testing.assert_close(pkw["hidden_states"], x, rtol=0, atol=0 if i == 0 else 1e-6)  # our Euler steps
            v = fam.predict(t, pkw["hidden_states"], sigmas[i:i + 1], cond, 3.5)  # --guidance: unused
            kw, model_out, g = calls[-1]
            _same_call(kw, pkw)
            assert kw["timestep"].dtype == torch.float32 and kw["attention_mask"].dtype == torch.bool
            assert torch.equal(kw["timestep"], (timesteps[i].float() / 1000).view(1))
            assert torch.equal(model_out, pipe_out) and torch.equal(v, pipe_out)  # not negated
            if i == 0:
                assert torch.allclose(g, torch.full((1,), 1.2)) and torch.allclose(pg, torch.full((1,), 1.2))
            else:
                assert g is None and pg is None
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # the scheduler's Euler step
        torch.testing.assert_close(x, out, rtol=0, atol=1e-6)

        # CFG: one step, the pipeline's batch [uncond "", cond], its timestep repeated
        calls.clear()
        pipe(prompt=SHORT, latents=x, **_call(num_inference_steps=1, guidance_scale=4.0))
        pkw, pipe_out, _ = calls[0]
        both = text_cond(fam, ["", SHORT], TEXT_LEN)
        v = fam.predict(t, x.repeat(2, 1, 1, 1), torch.ones(2), both, 1.0)
        _same_call(calls[-1][0], pkw)
        assert torch.equal(v, pipe_out)

        # two prompts, no CFG: the pipeline's timestep (1,) broadcasts, predict passes one per sample
        calls.clear()
        x2 = torch.randn(2, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(4))
        pipe(prompt=[SHORT, LONG], latents=x2, **_call(num_inference_steps=1))
        pkw, pipe_out, _ = calls[0]
        assert pkw["timestep"].shape == (1,)
        v = fam.predict(t, x2, torch.ones(2), text_cond(fam, [SHORT, LONG], TEXT_LEN), 1.0)
        kw = calls[-1][0]
        assert torch.equal(kw["timestep"], pkw["timestep"].expand(2))
        for k in ("hidden_states", "encoder_hidden_states", "attention_mask"):
            assert torch.equal(kw[k], pkw[k]), k

        # 14 steps: at one of them the scheduler's t / 1000 is an ulp off its sigma; predict at that sigma
        # still passes the pipeline's timestep (it rounds through 1000 sigma as the scheduler does)
        calls.clear()
        pipe(prompt=SHORT, latents=x, **_call(num_inference_steps=14))
        off = [i for i in range(14) if timesteps_off(pipe.scheduler, i)]
        assert len(off) == 1
        pkw = calls[off[0]][0]
        fam.predict(t, pkw["hidden_states"], pipe.scheduler.sigmas[off[0]:off[0] + 1], cond, 1.0)
        _same_call(calls[-1][0], pkw)
    hook.remove()
    torch.testing.assert_close(v, pipe_out, rtol=0, atol=1e-6)

    # in bf16 weights: the timestep stays float32 (the pipeline's t.float() / 1000), mask bool
    got = {}
    stub = lambda **kw: (got.update(kw), (torch.zeros_like(kw["hidden_states"]),))[1]  # noqa: E731
    bf = torch.bfloat16
    fam.predict(stub, x.to(bf), sigmas[1:2], {k: (v.to(bf) if v.is_floating_point() else v) for k, v in cond.items()},
                1.0)
    assert got["timestep"].dtype == torch.float32 and torch.equal(got["timestep"], (timesteps[1] / 1000).view(1))
    assert got["attention_mask"].dtype == torch.bool and got["hidden_states"].dtype == bf


def test_latents_are_what_the_pipeline_decodes(model, monkeypatch):
    """encode_images is (mode - 0.1159) * 0.3611 (the FLUX-style VAE), unpatched at the VAE's grid;
    handed to the pipeline as its latents with a transformer that predicts 0 (the Euler steps keep
    them), the pipeline's own unscaling and decode give the VAE's reconstruction of the mode. With a
    DC-AE (no shift_factor in its config: 0; a deterministic .latent) the latents are latent * 0.41407
    and decode the same way. An SD-style VAE (shift_factor None, which the pipeline's decode would add)
    and images the latents' patches do not tile are refused."""
    from diffusers import PRXPipeline

    pipe = _load(model)
    fam = _family(pipe)
    px = torch.rand(2, 3, RES, RES + 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = fam.encode_images(px)
    with torch.no_grad():
        mode = pipe.vae.encode(px).latent_dist.mode()
    assert lat.shape == (2, 4, RES // 2, (RES + 16) // 2) == mode.shape
    torch.testing.assert_close(lat, (mode - 0.1159) * 0.3611)
    assert not torch.allclose(lat, mode, atol=1e-2)
    call = _call(latents=lat, width=RES + 16)
    call.pop("output_type")
    call.pop("num_inference_steps")
    call.pop("guidance_scale")
    check_zero_model_decodes(pipe, mode, monkeypatch, call)
    monkeypatch.undo()

    dc = build_pipeline(vae="dc")
    assert dc.vae_scale_factor == dc.vae.spatial_compression_ratio == 2 and "shift_factor" not in dc.vae.config
    dfam = _family(dc)
    lat = dfam.encode_images(px)
    with torch.no_grad():
        z = dc.vae.encode(px).latent
    torch.testing.assert_close(lat, z * 0.41407)
    check_zero_model_decodes(dc, z, monkeypatch, dict(call, latents=lat))
    monkeypatch.undo()

    torch.manual_seed(1)
    sd = PRXPipeline(transformer=pipe.transformer, scheduler=pipe.scheduler, text_encoder=None, tokenizer=None,
                     vae=_vae(shift=None, scale=0.18215))
    with pytest.raises(ValueError, match="shift_factor=None"):
        _family(sd).encode_images(px)
    with pytest.raises(ValueError, match="--resolution.*divisible by 4"):
        fam.encode_images(px[..., :30])


def test_captions_padded_to_the_fixed_length_and_batch_independent(model):
    """encode_prompt pads every prompt to TEXT_LEN with the tokenizer's mask and encodes it under that
    mask: a caption's entry is its (TEXT_LEN, D) embedding and (TEXT_LEN,) bool mask, the pipeline's own
    rows, the same alone or next to a longer one; the caption is cleaned as the pipeline cleans it (a
    URL dropped); predict on a batch equals predict on each caption alone; the padding is masked, so the
    same caption at another length predicts the same, and without the mask it would not."""
    pipe = _load(model)
    fam = _family(pipe)
    cpu = torch.device("cpu")
    alone = fam.split_text(fam.encode_text([SHORT], cpu, TEXT_LEN))
    both = fam.split_text(fam.encode_text([SHORT, LONG], cpu, TEXT_LEN))
    long_alone = fam.split_text(fam.encode_text([LONG], cpu, TEXT_LEN))
    with torch.no_grad():
        ref, ref_mask, _, _ = pipe.encode_prompt([SHORT, LONG], do_classifier_free_guidance=False,
                                                 tokenizer_max_length=TEXT_LEN)
    n = [int(m.sum()) for m in ref_mask]
    assert 0 < n[0] < n[1] < TEXT_LEN
    for j, e in enumerate(both):
        assert set(e) == {"prompt_embeds", MASK}
        assert torch.equal(e["prompt_embeds"], ref[j]) and torch.equal(e[MASK], ref_mask[j])
        assert e[MASK].dtype == torch.bool and e[MASK][:n[j]].all() and not e[MASK][n[j]:].any()
    for a, b in ((alone[0], both[0]), (long_alone[0], both[1])):
        torch.testing.assert_close(a["prompt_embeds"], b["prompt_embeds"], rtol=1e-5, atol=1e-6)
        assert torch.equal(a[MASK], b[MASK])
    url = fam.split_text(fam.encode_text([SHORT + " https://example.com/x"], cpu, TEXT_LEN))[0]
    assert torch.equal(url[MASK], alone[0][MASK])
    torch.testing.assert_close(url["prompt_embeds"], alone[0]["prompt_embeds"], rtol=0, atol=0)

    t = pipe.transformer
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.99, 0.975])
    check_batch_independent(fam, t, x, sigma, both)
    with torch.no_grad():
        short = fam.predict(t, x[:1], sigma[:1], fam.collate(alone), 1.0)
        longer = fam.predict(t, x[:1], sigma[:1], text_cond(fam, [SHORT], TEXT_LEN + 8), 1.0)
        unmasked = fam.predict(t, x[:1], sigma[:1], dict(fam.collate(alone), **{MASK: torch.ones(1, TEXT_LEN,
                                                                                           dtype=torch.bool)}), 1.0)
    torch.testing.assert_close(longer, short, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked, short, atol=1e-3)


def test_max_sequence_length_and_bad_input(model, monkeypatch):
    """None is the pipeline's default, the tokenizer's model_max_length (512 here); a non-positive
    length, or a tokenizer without a model_max_length, is a ConfigError naming --max-sequence-length; a
    missing ftfy (the pipeline's prompt cleaning) is an ImportError that says so; latents not 4-D or
    not tiling the patches, a pipeline without its text encoder or its VAE, a dynamic-shift scheduler
    (the pipeline passes no mu), invert_sigmas and another scheduler class are refused;
    PRXPixelPipeline is refused with the reason."""
    import diffusers.pipelines.prx.pipeline_prx as pp
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXPixelPipeline

    from taca.train.families import family_for
    from taca.train.families.prx import PRXFamily

    pipe = _load(model)
    fam = _family(pipe)
    cpu = torch.device("cpu")
    enc = fam.encode_text([SHORT], cpu, None)
    assert enc["prompt_embeds"].shape == (1, 512, TEXT_DIM) and enc[MASK].shape == (1, 512)
    for bad in (0, -3, True):
        with pytest.raises(ConfigError, match="--max-sequence-length"):
            fam.encode_text([SHORT], cpu, bad)
    monkeypatch.setattr(pipe.tokenizer, "model_max_length", int(1e30))
    with pytest.raises(ConfigError, match="--max-sequence-length.*model_max_length"):
        fam.encode_text([SHORT], cpu, None)
    monkeypatch.undo()
    monkeypatch.delattr(pp, "ftfy")
    with pytest.raises(ImportError, match="pip install ftfy"):
        fam.encode_text([SHORT], cpu, TEXT_LEN)
    with pytest.raises(ConfigError, match="argument --model: PRXPipeline cleans every prompt with ftfy"):
        PRXFamily.check_config(None, "PRXPipeline")  # taca train asks before --out is touched
    monkeypatch.undo()
    PRXFamily.check_config(None, "PRXPipeline")
    cond = text_cond(fam, [SHORT], TEXT_LEN)
    with pytest.raises(ValueError, match="do not tile"):
        fam.predict(pipe.transformer, torch.zeros(1, 4, 15, 16), torch.tensor([0.99]), cond, 1.0)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        fam.predict(pipe.transformer, torch.zeros(1, 4, 1, 16, 16), torch.tensor([0.99]), cond, 1.0)
    for sch, msg in ((FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "no mu"),
                     (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
                     (DDIMScheduler(), "DDIMScheduler")):
        with pytest.raises(ValueError, match=msg):
            PRXFamily(SimpleNamespace(scheduler=sch, transformer=pipe.transformer))
    bare = PRXPipeline(transformer=pipe.transformer, scheduler=pipe.scheduler, text_encoder=None, tokenizer=None,
                       vae=None)
    with pytest.raises(ValueError, match="no VAE"):
        family_for(bare)
    pixel = PRXPixelPipeline(transformer=pipe.transformer, scheduler=pipe.scheduler, text_encoder=None,
                             tokenizer=None)
    with pytest.raises(ValueError, match="PRXPixelPipeline is not trained.*x0.*noise_scale"):
        family_for(pixel)
    fam.pipe.text_encoder = None
    with pytest.raises(ValueError, match="no text_encoder"):
        fam.encode_text([SHORT], cpu, TEXT_LEN)


def _lora_modules(t):
    return [(n, m) for n, m in t.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]


def test_adapter_loads_in_diffusers_and_taca(trained, model):
    """After lora_support, diffusers' transformer.load_lora_adapter(prefix="transformer") loads the adapter's
    layers with the trained scale (alpha 8 / rank 4, from the file's metadata), and
    taca.enable(pipe.transformer, lora=) gates the same adapter in: with TACA on both predict the same,
    other than the stock model; the pipeline runs with it, and disabling gives the stock output back."""
    from taca.train.families.prx import lora_support

    out = trained[0].out
    fresh = _load(model)
    fam = _family(fresh)  # the family gives the transformer the PEFT mixin; lora_support does it alone
    fresh.transformer.load_lora_adapter(out, prefix="transformer", weight_name=ADAPTER)
    lora = _lora_modules(fresh.transformer)
    assert {n for n, _ in lora} == _attn_names(N_BLOCKS)
    assert all(list(m.scaling.values()) == [2.0] for _, m in lora)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.99])
    other = _load(model)
    assert lora_support(other) is other.transformer and callable(other.transformer.load_lora_adapter)
    with torch.no_grad():
        cond = text_cond(fam, ["a red square"], TEXT_LEN)
        with taca.enabled(fresh.transformer, gamma=1.2):
            diffusers_loaded = fam.predict(fresh.transformer, x, sigma, cond, 1.0)
        stock = fam.predict(other.transformer, x, sigma, cond, 1.0)
        call = _call(prompt="a red square")
        base = other(generator=torch.Generator().manual_seed(0), **call).images
        with taca.enabled(other.transformer, gamma=1.2, lora=out):
            assert {n for n, _ in _lora_modules(other.transformer)} == _attn_names(N_BLOCKS)
            taca_loaded = fam.predict(other.transformer, x, sigma, cond, 1.0)
            on = other(generator=torch.Generator().manual_seed(0), **call).images
        assert torch.isfinite(on).all() and not torch.equal(on, base)
        assert torch.equal(other(generator=torch.Generator().manual_seed(0), **call).images, base)
    assert not any("lora" in n for n in other.transformer.state_dict())
    torch.testing.assert_close(taca_loaded, diffusers_loaded, rtol=0, atol=1e-6)
    assert not torch.allclose(taca_loaded, stock, atol=1e-5)


def test_adapter_loads_through_the_pipeline(trained, model):
    """taca.enable(pipe, lora=) on the PRX pipeline: PRXPipeline's load_lora_weights is Stable Diffusion's (it
    wants a UNet), so taca loads through the transformer's own loader; before lora_support the transformer
    has none, and the error says what to call; after it, the adapter is gated in and out as for any pipeline."""
    from taca.train.families.prx import lora_support

    pipe = _load(model)
    with pytest.raises(ValueError, match="PRXTransformer2DModel has no LoRA support.*lora_support"):
        taca.enable(pipe, gamma=1.2, lora=trained[0].out)
    assert taca.pipeline.get_handle(pipe) is None
    lora_support(pipe)
    call = _call(prompt="a red square")
    base = pipe(generator=torch.Generator().manual_seed(0), **call).images
    with taca.enabled(pipe, gamma=1.2, lora=trained[0].out):
        assert {n for n, _ in _lora_modules(pipe.transformer)} == _attn_names(N_BLOCKS)
        on = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert torch.isfinite(on).all() and not torch.equal(on, base)
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **call).images, base)
