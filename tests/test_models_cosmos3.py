"""Cosmos3 (Cosmos3OmniTransformer) with the taca.models.cosmos3 adapter, on tiny random-weight models
packed as Cosmos3OmniPipeline packs them ([text | vision | sound | action], one document per call): the
und (causal text) call stays stock; in the gen call the vision queries (noisy and clean conditioning
frames) get gamma on the text keys, GQA heads read as enable_gqa does, sound and action queries keep
their stock logits; outside the window and at gamma = 1 the model is stock bit for bit (two
resolutions); the layouts and modes TACA cannot do exactly are refused; the t >= 970 rule on UniPC's
flow timesteps."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca

from model_checks import (Capture, StockCalls, check_disable_restores, paper_attention_masks, processors_of, ranges,
                          span_mask, window)
from model_checks import check_checkpointing_keeps_state

N_LAYERS = 2
H, H_KV, D = 4, 2, 16
C, P = 4, 2  # latent channels, patch size
SOUND_DIM, ACTION_DIM = 6, 5


def _transformer(variant="qwen"):
    from diffusers import Cosmos3OmniTransformer

    extra = dict(hidden_act="relu2", qk_norm_for_text=False, use_und_k_norm_for_gen=True) if variant == "nemotron" \
        else {}
    torch.manual_seed(0)
    t = Cosmos3OmniTransformer(
        head_dim=D, hidden_size=32, intermediate_size=48, latent_channel=C, latent_patch_size=P,
        num_attention_heads=H, num_hidden_layers=N_LAYERS, num_key_value_heads=H_KV, patch_latent_dim=P * P * C,
        rope_axes_dim=[2, 3, 3], vocab_size=64, sound_gen=True, sound_dim=SOUND_DIM, action_gen=True,
        action_dim=ACTION_DIM, num_embodiment_domains=2, **extra,
    ).eval()
    with torch.no_grad():  # zero-initialized modality embeddings: randomize so sound / action tokens differ
        for p in t.parameters():
            if not p.any():
                p.normal_(0.0, 0.3)
    return t


def _inputs(L=7, thw=(2, 4, 6), t=990, cond_frames=(), sound=0, action=0, action_cond=(), seed=1):
    """The fields Cosmos3OmniPipeline passes for one prompt (text L tokens, one vision item of latent
    (T, H, W) whose frames cond_frames are clean, optionally sound and action streams)."""
    g = torch.Generator().manual_seed(seed)
    T, Hh, W = thw
    ph, pw = Hh // P, W // P
    n_vis = T * ph * pw
    noisy = torch.tensor([f for f in range(T) if f not in cond_frames], dtype=torch.long)
    mse = torch.cat([torch.arange(L + f * ph * pw, L + (f + 1) * ph * pw) for f in noisy.tolist()]) \
        if len(noisy) else torch.zeros(0, dtype=torch.long)
    d = dict(
        input_ids=torch.randint(0, 64, (L,), generator=g), text_indexes=torch.arange(L), und_len=L,
        vision_tokens=[torch.randn(1, C, T, Hh, W, generator=g)], vision_token_shapes=[(T, ph, pw)],
        vision_sequence_indexes=torch.arange(L, L + n_vis), vision_mse_loss_indexes=mse,
        vision_timesteps=torch.full((len(noisy) * ph * pw,), t), vision_noisy_frame_indexes=[noisy],
        return_dict=False,
    )
    cur = L + n_vis
    if sound:
        d.update(sound_tokens=[torch.randn(SOUND_DIM, sound, generator=g)], sound_token_shapes=[(sound, 1, 1)],
                 sound_sequence_indexes=torch.arange(cur, cur + sound), sound_mse_loss_indexes=torch.arange(cur, cur + sound),
                 sound_timesteps=torch.full((sound,), t), sound_noisy_frame_indexes=[torch.arange(sound)])
        cur += sound
    if action:
        a_noisy = torch.tensor([f for f in range(action) if f not in action_cond], dtype=torch.long)
        d.update(action_tokens=[torch.randn(action, ACTION_DIM, generator=g)], action_token_shapes=[(action, 1, 1)],
                 action_sequence_indexes=torch.arange(cur, cur + action), action_mse_loss_indexes=cur + a_noisy,
                 action_timesteps=torch.full((len(a_noisy),), t), action_noisy_frame_indexes=[a_noisy],
                 action_domain_ids=[torch.tensor([1])])
        cur += action
    d["sequence_length"] = cur
    d["position_ids"] = torch.arange(cur, dtype=torch.float32)[None].expand(3, cur).contiguous()
    return d, n_vis


class GenCalls:
    """Records every gen call of the TACA processors (q_gen, all K, all V and the TACA output of all gen
    rows, vision and others) and hands the processor the stock gen attention instead, so the rest of the
    forward is the stock model's."""

    def __init__(self, monkeypatch):
        from taca.models.cosmos3 import TacaCosmos3AttnProcessor

        self.calls = []
        orig = TacaCosmos3AttnProcessor._gen_attention

        def wrapped(proc, q_gen, all_k, all_v, stock):
            out = orig(proc, q_gen, all_k, all_v, stock)
            if out is not None:
                self.calls.append((q_gen.clone(), all_k.clone(), all_v.clone(), out.clone()))
            return stock(q_gen)

        monkeypatch.setattr(TacaCosmos3AttnProcessor, "_gen_attention", wrapped)


# (thw, conditioning frames, sound tokens, action tokens): T2V, I2V (frame 0 clean), T2I with more
# text than vision, video + sound, action-conditioned (forward dynamics: actions 0-1 clean)
CASES = [((2, 4, 6), (), 0, 0, 7), ((3, 4, 4), (0,), 0, 0, 7), ((1, 2, 4), (), 0, 0, 12),
         ((2, 4, 4), (), 5, 0, 7), ((2, 2, 4), (0,), 0, 4, 6), ((2, 2, 4), (0,), 3, 4, 5)]


@pytest.mark.parametrize("variant", ["qwen", "nemotron"])
@pytest.mark.parametrize("thw,cond,sound,action,L", CASES)
def test_gen_calls_are_the_paper_definition(monkeypatch, variant, thw, cond, sound, action, L):
    import diffusers.models.transformers.transformer_cosmos3 as tm

    t = _transformer(variant)
    kw, n_vis = _inputs(L, thw, 990, cond, sound, action, action_cond=(0, 1) if action else ())
    stock = StockCalls(monkeypatch, tm)
    with torch.no_grad():
        t(**kw)
    monkeypatch.undo()
    cap = Capture(monkeypatch)
    gen = GenCalls(monkeypatch)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**kw)
    n_gen = kw["sequence_length"] - L
    assert len(stock.calls) == 2 * N_LAYERS and len(gen.calls) == len(cap.calls) == N_LAYERS
    for i, (q, k, v, out) in enumerate(gen.calls):
        sq, sk, sv, _ = stock.calls[2 * i + 1]  # [und causal, gen full] per layer
        assert torch.equal(q.unsqueeze(0), sq) and torch.equal(k.unsqueeze(0), sk) and torch.equal(v.unsqueeze(0), sv)
        assert q.shape == (n_gen, H, D) and k.shape == (L + n_gen, H_KV, D)  # GQA heads as the stock call has them
        key_text = span_mask(1, L + n_gen, 0, L)
        vision_q = torch.arange(n_gen)[None] < n_vis  # sound / action queries: stock logits
        expect = paper_attention_masks(q[None], k[None], v[None], key_text, vision_q, torch.full((1,), 1.3))
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6)
    for q, k, v, opkw, _ in cap.calls:  # the op saw the vision queries only, all keys, the text first
        assert q.shape == (1, n_vis, H, D) and k.shape == (1, L + n_gen, H_KV, D)
        assert opkw["text_len"] == L and opkw["text_first"] is True and opkw.get("text_start") is None
        assert opkw["gamma_reverse"] == 1.0 and torch.equal(opkw["gamma"], torch.full((1,), 1.3))


@pytest.mark.parametrize("thw,sound,action", [((2, 4, 6), 0, 0), ((3, 2, 4), 3, 4)])
def test_outside_window_and_gamma_one_are_stock(thw, sound, action):
    t = _transformer()
    before = processors_of(t)
    inp = lambda step: _inputs(7, thw, step, (0,), sound, action)[0]  # noqa: E731
    with torch.no_grad():
        ref_in, ref_edge, ref_out = (t(**inp(s))[0][0] for s in (990, 970, 969))
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "cosmos3" and len(h.processors) == N_LAYERS
        assert sorted(h.processors) == [f"layers.{i}.self_attn" for i in range(N_LAYERS)]
        assert torch.equal(t(**inp(969))[0][0], ref_out) and h.last_gamma is None
        assert h.last_path == "host"  # one sync in the adapter, none in the hook
        assert not torch.equal(t(**inp(970))[0][0], ref_edge) and h.last_gamma is not None
        assert not torch.equal(t(**inp(990))[0][0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**inp(990))[0][0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    with torch.no_grad():
        assert torch.equal(t(**inp(990))[0][0], ref_in)


def test_unsupported_modes_are_refused():
    from taca import telemetry

    t = _transformer()
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        kw, _ = _inputs(7, (2, 4, 4), 990, (), sound=3)
        kw["sound_timesteps"] = torch.full((3,), 900)  # sound on another schedule than the vision target
        with pytest.raises(ValueError, match="timesteps differ"):
            t(**kw)
        kw, _ = _inputs(7, (2, 4, 4), 990)
        kw["vision_timesteps"][:4] = 500
        with pytest.raises(ValueError, match="timesteps differ"):
            t(**kw)
        kw, _ = _inputs(7, (2, 4, 4), 990)
        kw["und_len"] = 9  # two vision tokens inside the causal prefix
        with pytest.raises(ValueError, match="7 text tokens but und_len=9"):
            t(**kw)
        kw, _ = _inputs(7, (2, 4, 4), 990)
        kw["text_indexes"] = torch.arange(7) + 1
        kw["vision_sequence_indexes"] = torch.cat([torch.tensor([0]), kw["vision_sequence_indexes"][1:]])
        with pytest.raises(ValueError, match="outside the und prefix"):
            t(**kw)
        kw, _ = _inputs(7, (2, 4, 4), 990, cond_frames=(0, 1))  # no noisy token at all
        with pytest.raises(ValueError, match="no noisy token"):
            t(**kw)
        with telemetry.recording(lambda e: None), pytest.raises(NotImplementedError, match="image tokens only"):
            t(**_inputs(7, (2, 4, 4), 990)[0])
    with taca.enabled(t, gamma=1.3, gamma_reverse=1.2), torch.no_grad():
        with pytest.raises(ValueError, match="gamma_reverse=1.2"):
            t(**_inputs(7, (2, 4, 4), 990)[0])


def test_inverse_dynamics_reads_the_action_timestep():
    """All vision frames clean, actions noisy: the vision queries still get gamma, at the actions' t."""
    t = _transformer()
    kw, n_vis = _inputs(6, (2, 2, 4), 980, cond_frames=(0, 1), action=4)
    assert kw["vision_timesteps"].numel() == 0
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        t(**kw)
        assert torch.equal(h.last_gamma, torch.full((1,), 1.3))
        kw["action_timesteps"] = torch.full_like(kw["action_timesteps"], 960)
        t(**kw)
        assert h.last_gamma is None


def _flow_unipc(shift):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


def _hook_window(sch, steps):
    """The steps the adapter's rule turns on, from the int64 timesteps the pipeline passes."""
    t = _transformer()
    on = []
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        for i, ts in enumerate(sch.timesteps):
            kw, _ = _inputs(5, (1, 2, 2), ts.item())
            t(**kw)
            if h.last_gamma is not None:
                on.append(i)
    return on


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_window_matches_the_schedulers_sigma(shift):
    """UniPC's flow timesteps are int64 floor(1000 sigma): t >= 970 exactly where sigma >= 0.97."""
    steps = 12
    sch = _flow_unipc(shift)
    sch.set_timesteps(steps)
    assert sch.timesteps.dtype == torch.int64
    expect = window(sch.sigmas[:-1])
    assert expect and _hook_window(sch, steps) == expect


def cosmos3_windows():
    # the Cosmos3 checkpoints' scheduler_config.json is NOT known here: UniPCMultistepScheduler with flow sigmas
    # (prediction_type flow_prediction, no dynamic shift), flow_shift 1 and 5 shown; window from the scheduler's sigmas
    out = {}
    for shift in (1.0, 5.0):
        out[shift] = {}
        for steps in (35, 50):
            sch = _flow_unipc(shift)
            sch.set_timesteps(steps)
            out[shift][steps] = ranges(window(sch.sigmas[:-1]))
    return out


def test_window_steps_with_the_real_scheduler():
    assert cosmos3_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {1.0: {35: "0-1", 50: "0-1"}, 5.0: {35: "0-4", 50: "0-6"}}


# --- Cosmos3OmniPipeline end to end: a word-level tokenizer with a chat template written here, a tiny Wan VAE ---

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>"]
    words = "a red cube on top of blue sphere bad quality blurry cat dog".split()
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:3] + specials[4:])
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    return tok


def _omni_pipeline():
    from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=C, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * C, latents_std=[1.0] * C)
    return Cosmos3OmniPipeline(transformer=_transformer(), text_tokenizer=_tokenizer(), vae=vae,
                               scheduler=_flow_unipc(5.0), enable_safety_checker=False)


def _omni_kwargs(hw, frames, steps, image=None):
    return dict(prompt="a red cube on top of a blue sphere", negative_prompt="blurry", height=hw[0], width=hw[1],
                num_frames=frames, num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                use_system_prompt=False, add_resolution_template=False, add_duration_template=False,
                enable_safety_check=False, image=image)


@pytest.mark.parametrize("hw,frames,i2v", [((32, 48), 1, False), ((32, 32), 5, True)])
def test_pipeline_cfg_and_window(monkeypatch, hw, frames, i2v):
    from taca.pipeline import get_handle

    pipe = _omni_pipeline()
    steps = 6
    image = torch.rand(3, hw[0], hw[1]) if i2v else None
    stock = pipe(generator=torch.Generator().manual_seed(1), **_omni_kwargs(hw, frames, steps, image)).video
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        same = pipe(generator=torch.Generator().manual_seed(1), **_omni_kwargs(hw, frames, steps, image)).video
    assert torch.equal(same, stock)
    gen = GenCalls(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, k, o: seen.append((k["und_len"], get_handle(m).last_gamma)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        pipe(generator=torch.Generator().manual_seed(1), **_omni_kwargs(hw, frames, steps, image))
    hook.remove()
    on = window(pipe.scheduler.sigmas[:-1])
    assert on and on != list(range(steps)) and len(seen) == 2 * steps  # cond and uncond per step
    assert [i for i in range(steps) if seen[2 * i][1] is not None] == on
    assert all((seen[2 * i][1] is None) == (seen[2 * i + 1][1] is None) for i in range(steps))
    und = {s[0] for s in seen}
    assert len(und) == 2  # the prompt and the negative prompt: two text lengths
    assert len(gen.calls) == N_LAYERS * 2 * len(on)
    for q, k, v, out in gen.calls:
        n_gen = q.shape[0]
        L = k.shape[0] - n_gen
        assert L in und
        expect = paper_attention_masks(q[None], k[None], v[None], span_mask(1, L + n_gen, 0, L),
                                       torch.ones(1, n_gen, dtype=torch.bool), torch.full((1,), 1.3))
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("variant", ["qwen", "nemotron"])
@pytest.mark.parametrize("thw,cond,sound,action", [((2, 4, 6), (), 0, 0), ((3, 2, 4), (0,), 3, 4)])
def test_gradient_checkpointing_keeps_the_call_state(variant, thw, cond, sound, action):
    """The forward carries no attention kwargs: the hook hands each call's state to the processors,
    and to the blocks recomputed in the backward pass through the checkpointing function,
    conditioning frames, sound and action streams included (t = 1000 sigma). The model returns lists
    of per-item vision / sound / action outputs: the check compares one tensor, their concatenation."""
    from diffusers import Cosmos3OmniTransformer

    class OneTensor(Cosmos3OmniTransformer):
        def forward(self, *args, **kwargs):
            outs = super().forward(*args, **kwargs)
            return (torch.cat([o.flatten() for items in outs if items is not None for o in items]),)

    def make():
        t = _transformer(variant)
        t.__class__ = OneTensor  # same modules and weights, the forward's outputs concatenated
        return t

    check_checkpointing_keeps_state(make, _inputs(thw=thw, cond_frames=cond, sound=sound, action=action)[0])
