"""MiniMax-H3 (MiniMaxH3Transformer3DModel) with the taca.models.minimax_h3 adapter, on tiny random-weight
models fed the packed layouts the modular pipeline builds ([text | keyframe video rows | audio rows |
target video rows], its own build_packed_sequence / build_row_timesteps): the token refiner stays
stock; in the joint blocks the video queries (target and keyframe rows) get gamma on the text keys,
text and audio queries keep their stock logits; outside the window and at gamma = 1 the model is stock
bit for bit (two resolutions); unsupported layouts and gamma_reverse are refused; the rule reads the
target video's timestep on the real MiniMaxH3Scheduler (video shift 12, audio shift 3)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca

from model_checks import (Capture, StockCalls, check_disable_restores, paper_attention_masks, processors_of, ranges,
                          span_mask, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=1,
            ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=20, freq_dim=16,
            time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2)
N_BLOCKS = TINY["num_layers"]
H, D = 2, 16
AUDIO_CHANNELS, VIDEO_TAG, TEXT_TAG, AUDIO_TAG = 2, 0, 1, 2
KEYFRAME_AUG = 0.999


def _transformer():
    from diffusers import MiniMaxH3Transformer3DModel

    torch.manual_seed(0)
    return MiniMaxH3Transformer3DModel(**TINY).eval()


def _layout(L, frames, hw, n_audio, anchors):
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3PrepareLayoutStep

    tags = torch.full((L,), TEXT_TAG)
    tags[2:4] = VIDEO_TAG  # a vision block inside the encoded prompt (tagged video by the encoder)
    return MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        tags, frames, hw[0], hw[1], n_audio, TINY["patch_size"], AUDIO_CHANNELS, AUDIO_TAG, VIDEO_TAG, anchors)


def _inputs(B=2, L=7, frames=2, hw=(4, 6), n_audio=3, anchors=("first",), t_video=0.01, t_audio=0.2, seed=1):
    """What MiniMaxH3LoopDenoiser passes for one step (timesteps reversed: t = 1 - sigma)."""
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3SetTimestepsStep

    pos, tags, vid, aud, txt, n_cond_v, n_cond_a = _layout(L, frames, hw, n_audio, anchors)
    ts, ts_idx = MiniMaxH3SetTimestepsStep.build_row_timesteps(
        vid, aud, n_cond_v, n_cond_a, L, float(t_video), float(t_audio), max(float(t_video), KEYFRAME_AUG), 1.0)
    g = torch.Generator().manual_seed(seed)
    d = dict(hidden_states=torch.randn(B, vid.numel(), 16, generator=g),
             audio_hidden_states=torch.randn(B, aud.numel(), 6, generator=g),
             encoder_hidden_states=torch.randn(B, L, 20, generator=g), timestep=ts, timestep_indices=ts_idx,
             token_tags=tags, position_ids=pos.float(), video_indices=vid, audio_indices=aud, text_indices=txt,
             return_dict=False)
    return d


class JointCalls:
    """Records each joint call of the TACA processors (q, k, v, the TACA output of all rows) and hands the
    processor the stock attention instead, so the rest of the forward is the stock model's."""

    def __init__(self, monkeypatch):
        from taca.models.minimax_h3 import TacaMiniMaxH3AttnProcessor

        self.calls = []
        orig = TacaMiniMaxH3AttnProcessor._joint

        def wrapped(proc, q, k, v, mask, stock):
            out = orig(proc, q, k, v, mask, stock)
            if out is not None:
                self.calls.append((q.clone(), k.clone(), v.clone(), out.clone()))
            return stock(q)

        monkeypatch.setattr(TacaMiniMaxH3AttnProcessor, "_joint", wrapped)


# (B, text, latent frames, latent hw, audio latents, keyframe anchors): t2va, fl2va with first and
# first+last keyframes, more text than video
CASES = [(2, 7, 2, (4, 6), 3, ()), (1, 5, 2, (4, 4), 2, ("first",)), (2, 9, 3, (2, 4), 2, ("first", "last")),
         (1, 20, 1, (2, 4), 1, ("first",))]


@pytest.mark.parametrize("B,L,frames,hw,n_audio,anchors", CASES)
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, frames, hw, n_audio, anchors):
    import diffusers.models.transformers.transformer_minimax_h3 as tm

    t = _transformer()
    kw = _inputs(B, L, frames, hw, n_audio, anchors)
    stock = StockCalls(monkeypatch, tm)
    with torch.no_grad():
        t(**kw)
    monkeypatch.undo()
    cap = Capture(monkeypatch)
    joint = JointCalls(monkeypatch)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        t(**kw)
        assert sorted(h.processors) == [f"transformer_blocks.{i}.attn" for i in range(N_BLOCKS)]
    n_ref = TINY["num_refiner_layers"]
    assert len(stock.calls) == n_ref + N_BLOCKS and len(joint.calls) == len(cap.calls) == N_BLOCKS
    N = kw["position_ids"].shape[0]
    vid = kw["video_indices"]
    video_q = torch.zeros(B, N, dtype=torch.bool)
    video_q[:, vid] = True  # keyframe and target rows; text and audio queries: stock logits
    for i, (q, k, v, out) in enumerate(joint.calls):
        sq, sk, sv, smask = stock.calls[n_ref + i]
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and smask is None
        expect = paper_attention_masks(q, k, v, span_mask(B, N, 0, L), video_q, torch.full((B,), 1.3))
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6)
    for q, k, v, opkw, _ in cap.calls:  # the op saw the video queries only, all keys, the text first
        assert q.shape == (B, vid.numel(), H, D) and k.shape == (B, N, H, D)
        assert opkw["text_len"] == L and opkw["text_first"] is True and opkw.get("text_start") is None
        assert opkw["gamma_reverse"] == 1.0 and torch.equal(opkw["gamma"], torch.full((B,), 1.3))


@pytest.mark.parametrize("hw,anchors", [((4, 6), ("first",)), ((2, 4), ())])
def test_outside_window_and_gamma_one_are_stock(hw, anchors):
    t = _transformer()
    before = processors_of(t)
    inp = lambda tv: _inputs(2, 7, 2, hw, 3, anchors, t_video=tv)  # noqa: E731
    with torch.no_grad():
        ref_in, ref_out = t(**inp(0.01))[0], t(**inp(0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "minimax_h3" and len(h.processors) == N_BLOCKS
        assert torch.equal(t(**inp(0.5))[0], ref_out) and h.last_gamma is None
        assert h.last_path == "host"  # one sync in the adapter, none in the hook
        assert not torch.equal(t(**inp(0.01))[0], ref_in) and torch.equal(h.last_gamma, torch.full((2,), 1.3))
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**inp(0.01))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    with torch.no_grad():
        assert torch.equal(t(**inp(0.01))[0], ref_in)


def test_the_rule_reads_the_target_video_timestep():
    """Keyframe rows (pinned at 0.999) and audio (its own schedule) do not decide: the target video does."""
    t = _transformer()
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(t_video=0.02, t_audio=0.5))  # video sigma 0.98, audio 0.5: on
        assert h.last_gamma is not None
        t(**_inputs(t_video=0.04, t_audio=0.0))  # video sigma 0.96, audio 1.0: off
        assert h.last_gamma is None


def test_unsupported_modes_are_refused():
    from taca import telemetry

    t = _transformer()
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        kw = _inputs()
        L = kw["encoder_hidden_states"].shape[1]
        kw["text_indices"] = kw["text_indices"] + 1  # text moved one row right, the row at L moved to 0
        kw["audio_indices"] = torch.where(kw["audio_indices"] == L, torch.zeros_like(kw["audio_indices"]),
                                          kw["audio_indices"])
        kw["video_indices"] = torch.where(kw["video_indices"] == L, torch.zeros_like(kw["video_indices"]),
                                          kw["video_indices"])
        with pytest.raises(ValueError, match="not the first 7 rows"):
            t(**kw)
        with telemetry.recording(lambda e: None), pytest.raises(NotImplementedError, match="image tokens only"):
            t(**_inputs())
    with taca.enabled(t, gamma=1.3, gamma_reverse=1.2), torch.no_grad():
        with pytest.raises(ValueError, match="gamma_reverse=1.2"):
            t(**_inputs())


def _sigma_steps(steps, shift):
    from diffusers import MiniMaxH3Scheduler

    sch = MiniMaxH3Scheduler(shift=shift)
    sch.set_timesteps(steps)
    return sch


def test_window_from_the_real_schedulers():
    """The steps the hook turns on (from the packed timesteps of each step) are the video schedule's
    sigma >= 0.97 steps, whatever the audio schedule does."""
    steps = 20
    video, audio = _sigma_steps(steps, 12.0), _sigma_steps(steps, 3.0)
    t = _transformer()
    on = []
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        for i, (tv, ta) in enumerate(zip(video.timesteps, audio.timesteps)):
            t(**_inputs(1, 5, 1, (2, 4), 1, ("first",), t_video=tv.item(), t_audio=ta.item()))
            if h.last_gamma is not None:
                on.append(i)
    expect = window(video.sigmas[:-1])
    assert expect and on == expect and on != window(audio.sigmas[:-1])


def minimax_h3_windows():
    # MiniMaxH3Scheduler's shift 12 (video) is the class default, the released value per its docstring;
    # num_inference_steps counts sigma grid points (steps - 1 model evaluations)
    return {steps: ranges(window(_sigma_steps(steps, 12.0).sigmas[:-1])) for steps in (30, 50)}


def test_window_steps_with_the_real_scheduler():
    assert minimax_h3_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {30: "0-7", 50: "0-13"}


@pytest.mark.parametrize("hw,anchors", [((4, 6), ("first",)), ((2, 4), ())])
def test_gradient_checkpointing_keeps_the_call_state(hw, anchors):
    """The forward carries no attention kwargs: the hook hands each call's state (text, video and
    audio spans of the packed sequence) to the processors, and to the blocks recomputed in the backward
    pass through the checkpointing function (t = 1 - sigma, per token)."""
    check_checkpointing_keeps_state(_transformer, _inputs(hw=hw, anchors=anchors))
