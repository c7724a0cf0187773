"""taca.analysis: telemetry math against materialized probabilities, on synthetic q/k and on
tiny FLUX / SD3.5 models (the events the processors really emit)."""
import math

import pytest
import torch

import taca
from taca import analysis as ta
from taca import reference, telemetry


# Recorded numbers come from float32 lse / text_mass (the kernel's outputs) and float32 matmuls;
# compared with float64 materialized probabilities of size ~0.1-0.5, 1e-5 is ~100 float32 ulp.


def _materialized(q, k, text_len, text_first, gamma):
    """P (B, H, N, N) float64 with gamma on (visual query, text key) logits."""
    q, k = q.detach().double().cpu(), k.detach().double().cpu()
    gamma = gamma.detach().cpu() if isinstance(gamma, torch.Tensor) else gamma
    B, H, N, D = q.shape
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
    s = s * reference.logit_multiplier(N, text_len, text_first, gamma, 1.0, B)
    return torch.softmax(s, dim=-1)


@pytest.mark.parametrize("text_first", [True, False])
def test_counterfactual_text_mass_matches_materialized(text_first):
    B, H, N, D, L = 2, 3, 71, 32, 13
    q, k, v = (torch.randn(B, H, N, D) * 1.5 for _ in range(3))
    g0 = torch.tensor([1.2, 1.0])
    _, lse, tm = taca.joint_attention(q, k, v, text_len=L, text_first=text_first, gamma=g0,
                                      return_lse=True, return_text_mass=True)
    gammas = [1.0, 1.15, 1.3, 0.8]
    cf = ta.counterfactual_text_mass(q, k, lse, tm, text_len=L, text_first=text_first,
                                     scale=1 / math.sqrt(D), gammas=gammas)
    assert cf.shape == (len(gammas), B, H, N - L)
    tb, te = (0, L) if text_first else (N - L, N)
    for i, g in enumerate(gammas):
        P = _materialized(q, k, L, text_first, g)
        ref = ta._visual(P[..., tb:te].sum(-1), L, text_first)
        torch.testing.assert_close(cf[i].double(), ref, atol=1e-5, rtol=0)
    # larger gamma -> more mass on text, for these random logits, at every query on average
    assert (cf[2].mean() > cf[1].mean() > cf[0].mean() > cf[3].mean())


@pytest.mark.parametrize("text_first", [True, False])
def test_text_token_probs_matches_materialized(text_first):
    B, H, N, D, L = 2, 2, 40, 16, 7
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    g0 = torch.tensor([1.3, 1.1])
    _, lse = taca.joint_attention(q, k, v, text_len=L, text_first=text_first, gamma=g0, return_lse=True)
    idx = [0, 4, 6]
    p = ta.text_token_probs(q, k, lse, text_len=L, text_first=text_first, gamma=g0,
                            scale=1 / math.sqrt(D), token_indices=idx)
    P = _materialized(q, k, L, text_first, g0)
    tb = 0 if text_first else N - L
    ref = ta._visual(P[..., [tb + j for j in idx]], L, text_first)
    torch.testing.assert_close(p.double(), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="token index 7"):
        ta.text_token_probs(q, k, lse, text_len=L, text_first=text_first, gamma=g0, scale=0.25, token_indices=[7])


def _check_recorder_against_events(rec_tel, events, steps, gammas, token_idx, grid):
    """Recompute every recorded number from the raw events with materialized probabilities."""
    names = list(dict.fromkeys(e.name for e in events if 0 < e.text_len < e.q.shape[2]))
    assert rec_tel.layers == names
    assert rec_tel.num_steps == steps
    per_step = len(events) // steps
    maps_acc = {}
    for n, e in enumerate(events):
        s = n // per_step
        if not 0 < e.text_len < e.q.shape[2]:
            continue
        li = names.index(e.name)
        N = e.q.shape[2]
        tb, te = (0, e.text_len) if e.text_first else (N - e.text_len, N)
        P = _materialized(e.q, e.k, e.text_len, e.text_first, e.gamma)
        vis = ta._visual(P[..., tb:te].sum(-1), e.text_len, e.text_first)  # (B, H, Nv)
        torch.testing.assert_close(rec_tel.mass[s, li].double(), vis.mean(dim=(1, 2)), atol=1e-5, rtol=0)
        torch.testing.assert_close(rec_tel.gamma[s, li], e.gamma.float().cpu())
        for g in gammas:
            Pg = _materialized(e.q, e.k, e.text_len, e.text_first, g)
            ref = ta._visual(Pg[..., tb:te].sum(-1), e.text_len, e.text_first).mean(dim=(1, 2))
            torch.testing.assert_close(rec_tel.counterfactual[g][s, li].double(), ref, atol=1e-5, rtol=0)
        m = ta._visual(P[..., [tb + j for j in token_idx]].sum(-1), e.text_len, e.text_first).mean(1)
        acc = maps_acc.setdefault(s, [])
        acc.append(m)
    for s, ms in maps_acc.items():
        ref = torch.stack(ms).mean(0)[:, : grid[0] * grid[1]].reshape(-1, *grid)
        torch.testing.assert_close(rec_tel.maps[s].double(), ref, atol=1e-5, rtol=0)


def test_recorder_tiny_flux_matches_materialized():
    tiny = pytest.importorskip("taca.tiny")
    pipe = tiny.flux_pipeline(seed=0)
    inputs = tiny.flux_inputs(pipe, text_len=12, height=64, width=64, num_inference_steps=3)  # 16 image tokens
    gammas = [1.0, 1.25]
    events = []
    taca.enable(pipe, gamma=1.2, schedule="paper")
    try:
        with telemetry.recording(events.append):
            with ta.record(pipe, gammas=gammas, token_indices=[1, 5], grid=(4, 4)) as rec:
                pipe(**inputs)
    finally:
        taca.disable(pipe)
    tel = rec.result()
    assert len(events) == 3 * 4  # 2 double + 2 single blocks, 3 steps
    _check_recorder_against_events(tel, events, 3, gammas, [1, 5], (4, 4))
    # the paper rule: gamma 1.2 while sigma >= 0.97 (step 0 here), 1 afterwards
    assert tel.sigmas[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(tel.sigmas, tel.sigmas[1:]))
    expect = torch.tensor([1.2 if s >= 0.97 - 1e-5 else 1.0 for s in tel.sigmas])
    torch.testing.assert_close(tel.gamma_per_step(), expect)
    # where gamma is 1, the in-effect mass equals the gamma=1 evaluation; where 1.2, it is larger
    torch.testing.assert_close(tel.mass[1:], tel.counterfactual[1.0][1:], atol=1e-6, rtol=0)
    assert bool((tel.mass[0] > tel.counterfactual[1.0][0]).all())
    assert tel.per_step().shape == (3,) and tel.per_layer().shape == (4,)
    assert tel.relative_magnitude().shape == (3, 4)


def test_recorder_tiny_sd35m_cfg_skips_image_only_attention():
    tiny = pytest.importorskip("taca.tiny")
    pipe = tiny.sd3_pipeline("sd35m", seed=0)
    inputs = tiny.sd3_inputs(pipe, text_len=10, height=32, width=32, num_inference_steps=2)  # 16 image tokens
    events = []
    with taca.enabled(pipe, gamma=1.3, schedule="constant"):
        with telemetry.recording(events.append):
            with ta.record(pipe, gammas=[1.0], token_indices=[0], grid=(4, 4)) as rec:
                pipe(**inputs)
    tel = rec.result()
    joint = [e for e in events if 0 < e.text_len < e.q.shape[2]]
    assert len(joint) == 2 * 3 and len(tel.layers) == 3  # attn of 3 blocks; attn2 (no text) skipped
    assert tel.mass.shape == (2, 3, 2)  # CFG batch [uncond, cond]
    assert tel.sigmas[0] == pytest.approx(1.0)
    _check_recorder_against_events(tel, joint, 2, [1.0], [0], (4, 4))
    assert bool((tel.mass > tel.counterfactual[1.0]).all())


def test_record_without_taca_reports_clearly():
    tiny = pytest.importorskip("taca.tiny")
    pipe = tiny.flux_pipeline(seed=0)
    with ta.record(pipe) as rec:
        pipe(**tiny.flux_inputs(pipe, num_inference_steps=1))
    with pytest.raises(RuntimeError, match="taca.enable"):
        rec.result()


def test_plots_and_map_difference(tmp_path):
    pytest.importorskip("matplotlib")
    S, L, B = 5, 3, 1
    mass = torch.rand(S, L, B) * 0.2
    tel = ta.TextMassTelemetry(sigmas=[1.0] * S, layers=["a", "b", "c"], mass=mass, gamma=torch.ones(S, L, B),
                               counterfactual={1.0: mass, 1.2: mass * 1.1}, maps=torch.rand(S, B, 4, 4))
    tel2 = ta.TextMassTelemetry(sigmas=[1.0] * S, layers=["a", "b", "c"], mass=mass * 1.1, gamma=torch.ones(S, L, B),
                                maps=tel.maps + 0.5)
    torch.testing.assert_close(ta.map_difference(tel2, tel), torch.full((S, B, 4, 4), 0.5))
    fig = ta.plot_text_mass({"gamma=1": tel, "1.2*": tel.relative_magnitude(1.2), "paper": tel2},
                            layer_names=tel.layers, baseline="gamma=1")
    p = ta.save_figure(fig, str(tmp_path / "tm.png"))
    fig2 = ta.plot_attention_maps(tel.maps, tel2.maps, steps=[0, 1, 2])
    p2 = ta.save_figure(fig2, str(tmp_path / "maps.png"))
    for f in (p, p2):
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="gamma=1.3"):
        tel.per_step(gamma=1.3)
    with pytest.raises(ValueError, match="token_indices"):
        ta.map_difference(tel2, ta.TextMassTelemetry([1.0], ["a"], mass[:1], mass[:1]))


def test_recorder_true_cfg_calls_join_their_step():
    tiny = pytest.importorskip("taca.tiny")
    pipe = tiny.flux_pipeline(seed=0)
    inputs = tiny.flux_inputs(pipe, text_len=8, height=64, width=64, num_inference_steps=2)
    g = torch.Generator().manual_seed(5)
    inputs.update(negative_prompt_embeds=torch.randn(inputs["prompt_embeds"].shape, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(inputs["pooled_prompt_embeds"].shape, generator=g),
                  true_cfg_scale=2.0)
    events = []
    with taca.enabled(pipe, gamma=1.2, schedule="constant"):
        with telemetry.recording(events.append):
            with ta.record(pipe, gammas=[1.0]) as rec:
                pipe(**inputs)
    tel = rec.result()
    assert len(events) == 2 * 2 * 4  # 2 steps x (cond + uncond call) x 4 attention modules
    assert tel.mass.shape == (2, 4, 2)  # the uncond call's sample sits beside the cond one
    assert len(tel.sigmas) == 2 and tel.sigmas[0] > tel.sigmas[1]
    for n, e in enumerate(events):
        step, call, li = n // 8, (n // 4) % 2, n % 4
        P = _materialized(e.q, e.k, e.text_len, e.text_first, e.gamma)
        ref = ta._visual(P[..., : e.text_len].sum(-1), e.text_len, e.text_first).mean(dim=(1, 2))
        torch.testing.assert_close(tel.mass[step, li, call:call + 1].double(), ref, atol=1e-5, rtol=0)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _kernel_tol(e, tm_ref_vis):
    """Tolerance for numbers derived from the kernel's float32 lse / text_mass on bf16 inputs:
    4x the kernel's own text_mass error against the float64 reference, plus 1e-5."""
    err = (ta._visual(e.text_mass, e.text_len, e.text_first).double() - tm_ref_vis).abs().max().item()
    return 4 * err + 1e-5


@needs_cuda
def test_recorder_cuda_bf16_kernel_events():
    tiny = pytest.importorskip("taca.tiny")
    pipe = tiny.flux_pipeline(seed=0, dtype=torch.bfloat16).to("cuda")
    inputs = tiny.flux_inputs(pipe, text_len=24, height=128, width=128, num_inference_steps=3)  # 64 image tokens
    inputs = {k: (v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    events = []
    with taca.enabled(pipe, gamma=1.2, schedule="paper"):
        with telemetry.recording(events.append):
            with ta.record(pipe, gammas=[1.0, 1.3], token_indices=[2, 7], grid=(8, 8)) as rec:
                pipe(**inputs)
    tel = rec.result()
    assert events and all(e.q.is_cuda and e.q.dtype == torch.bfloat16 for e in events)
    assert len(events) == 3 * 4 and tel.mass.shape == (3, 4, 1)
    for n, e in enumerate(events):
        s, li = n // 4, n % 4
        L = e.text_len
        # the in-effect mass is the kernel's own text_mass, averaged over heads and image queries
        own = ta._visual(e.text_mass, L, e.text_first).float().mean(dim=(1, 2)).cpu()
        torch.testing.assert_close(tel.mass[s, li], own)
        P = _materialized(e.q, e.k, L, e.text_first, e.gamma)
        tol = _kernel_tol(e, ta._visual(P[..., :L].sum(-1), L, e.text_first).to(e.q.device))
        for g in (1.0, 1.3):
            Pg = _materialized(e.q, e.k, L, e.text_first, g)
            ref = ta._visual(Pg[..., :L].sum(-1), L, e.text_first).mean(dim=(1, 2)).cpu()
            torch.testing.assert_close(tel.counterfactual[g][s, li].double(), ref, atol=tol, rtol=0)
    assert bool((tel.mass[0] > tel.counterfactual[1.0][0]).all())  # step 0: sigma = 1, gamma 1.2


@needs_cuda
def test_counterfactual_and_maps_flux_1024_shape_cuda():
    """FLUX.1 at 1024x1024: B=1, H=24, N=4608 (512 text first), D=128, bf16; exact against a
    materialized reference computed head by head; extra memory far below one N x N matrix."""
    B, H, N, D, L = 1, 24, 4608, 128, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    qb, kb = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, N, D) views, as the processors emit
    _, lse, tm = taca.joint_attention(q, k, v, text_len=L, text_first=True, gamma=1.2, layout="bnhd",
                                      return_lse=True, return_text_mass=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cf = ta.counterfactual_text_mass(qb, kb, lse, tm, text_len=L, text_first=True, scale=D ** -0.5,
                                     gammas=[1.0, 1.3])
    p = ta.text_token_probs(qb, kb, lse, text_len=L, text_first=True, gamma=1.2, scale=D ** -0.5,
                            token_indices=[5, 100, 511])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 256 * 2**20, f"{extra / 2**20:.0f} MiB extra (one fp32 N x N for all heads: 1944 MiB)"
    err_kernel = 0.0
    err_cf = [0.0, 0.0]
    err_p = 0.0
    for h in range(H):
        s = (qb[0, h].double() @ kb[0, h].double().T) * D ** -0.5
        for gi, gg in enumerate((1.2, 1.0, 1.3)):
            sg = s.clone()
            sg[L:, :L] *= gg
            P = torch.softmax(sg, dim=-1)
            t = P[L:, :L].sum(-1)
            if gi == 0:
                err_kernel = max(err_kernel, (tm[0, h, L:].double() - t).abs().max().item())
                err_p = max(err_p, (p[0, h].double() - P[L:, [5, 100, 511]]).abs().max().item())
            else:
                err_cf[gi - 1] = max(err_cf[gi - 1], (cf[gi - 1, 0, h].double() - t).abs().max().item())
    print(f"kernel text_mass err {err_kernel:.2e}; counterfactual err {err_cf}; token probs err {err_p:.2e}; "
          f"extra memory {extra / 2**20:.1f} MiB")
    tol = 4 * err_kernel + 1e-5
    assert max(err_cf) <= tol and err_p <= tol
