"""TACA processors on tiny FLUX / SD3 / SD3.5 models: gamma = 1 is the stock model bit for bit;
gamma != 1 is the paper's definition, checked against a materialized computation written here."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
import taca.processors as tp
from taca import telemetry, tiny
from taca.models.flux import TacaFluxAttnProcessor


def _pipe(kind):
    return tiny.flux_pipeline() if kind == "flux" else tiny.sd3_pipeline(kind)


def _inputs(pipe, kind, **kw):
    return tiny.flux_inputs(pipe, **kw) if kind == "flux" else tiny.sd3_inputs(pipe, **kw)


KINDS = ["flux", "sd3", "sd35m", "sd35l"]


@pytest.mark.parametrize("kind", KINDS)
def test_gamma_one_is_stock_bit_identical(kind):
    pipe = _pipe(kind)
    ref = pipe(**_inputs(pipe, kind, batch=2)).images
    taca.enable(pipe, gamma=1.0, schedule="constant")
    try:
        names = {type(m.processor).__name__ for _, m in tp_modules(pipe.transformer)}
        assert names == {"TacaFluxAttnProcessor" if kind == "flux" else "TacaJointAttnProcessor"}
        out = pipe(**_inputs(pipe, kind, batch=2)).images
    finally:
        taca.disable(pipe)
    assert torch.equal(out, ref)


def tp_modules(transformer):
    return [(n, m) for n, m in transformer.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def _paper_attention(q, k, v, text_len, text_first, gamma):
    """The paper's definition, materialized in float64. q, k, v: (B, H, N, D); gamma: (B,)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, D = q.shape
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    text = torch.zeros(N, dtype=torch.bool)
    if text_first:
        text[:text_len] = True
    else:
        text[N - text_len:] = True
    vis_q_text_k = (~text)[:, None] & text[None, :]
    g = gamma.double().view(B, 1, 1, 1)
    logits = torch.where(vis_q_text_k, logits * g, logits)
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p, v)


class _Capture:
    """Wraps taca.processors.joint_attention: records every call's inputs and output."""

    def __init__(self, monkeypatch):
        self.calls = []
        orig = tp.joint_attention

        def wrapped(q, k, v, **kw):
            out = orig(q, k, v, **kw)
            o = out[0] if isinstance(out, tuple) else out
            self.calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), dict(kw), o.detach().clone()))
            return out

        monkeypatch.setattr(tp, "joint_attention", wrapped)


@pytest.mark.parametrize(
    "kind,text_len,hw,batch",
    [
        ("flux", 1, (32, 32), 1),
        ("flux", 9, (64, 48), 2),
        ("flux", 20, (48, 64), 2),
        ("sd3", 1, (16, 16), 1),
        ("sd3", 7, (24, 16), 2),
        ("sd35m", 13, (16, 24), 1),
        ("sd35l", 5, (16, 16), 2),
    ],
)
def test_gamma_matches_paper_definition(monkeypatch, kind, text_len, hw, batch):
    pipe = _pipe(kind)
    cap = _Capture(monkeypatch)
    taca.enable(pipe, gamma=1.2, schedule="constant")
    try:
        pipe(**_inputs(pipe, kind, batch=batch, text_len=text_len, height=hw[0], width=hw[1], num_inference_steps=2))
    finally:
        taca.disable(pipe)
    t = pipe.transformer
    n_joint = (t.config.num_layers + t.config.num_single_layers) if kind == "flux" else t.config.num_layers
    assert len(cap.calls) == 2 * n_joint  # 2 steps; SD3.5-M attn2 (no text) never goes through TACA
    if kind == "flux":
        n_img = (hw[0] // 16) * (hw[1] // 16)
        eff_batch = batch
    else:
        n_img = (hw[0] // 8) * (hw[1] // 8)
        eff_batch = 2 * batch  # CFG: [uncond, cond]
    for q, k, v, kw, out in cap.calls:
        layout = kw["layout"]
        assert layout == ("bnhd" if kind == "flux" else "bhnd")
        to_bhnd = (lambda x: x.transpose(1, 2)) if layout == "bnhd" else (lambda x: x)
        qb, kb, vb, ob = map(to_bhnd, (q, k, v, out))
        assert qb.shape[0] == eff_batch and qb.shape[2] == n_img + text_len
        assert kw["text_len"] == text_len and kw["text_first"] == (kind == "flux")
        assert kw["gamma_reverse"] == 1.0
        assert kw["scale"] == pytest.approx(1 / math.sqrt(qb.shape[-1]))
        gamma = kw["gamma"]
        assert gamma.shape == (eff_batch,) and torch.all(gamma == 1.2)
        expect = _paper_attention(qb, kb, vb, text_len, kind == "flux", gamma)
        torch.testing.assert_close(ob.double(), expect, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["flux", "sd35m"])
def test_captured_qkv_are_the_stock_ones(monkeypatch, kind):
    """The first attention call of a step sees exactly the q, k, v the stock processor builds."""
    pipe = _pipe(kind)
    t = pipe.transformer
    stock = {}
    if kind == "flux":
        import diffusers.models.transformers.transformer_flux as tf

        orig = tf.dispatch_attention_fn

        def grab(q, k, v, **kw):
            stock.setdefault("qkv", (q.clone(), k.clone(), v.clone()))
            return orig(q, k, v, **kw)

        monkeypatch.setattr(tf, "dispatch_attention_fn", grab)
    else:
        import torch.nn.functional as F

        orig = F.scaled_dot_product_attention

        def grab(q, k, v, **kw):
            stock.setdefault("qkv", (q.clone(), k.clone(), v.clone()))
            return orig(q, k, v, **kw)

        monkeypatch.setattr(F, "scaled_dot_product_attention", grab)
    inputs = lambda: _inputs(pipe, kind, batch=2, num_inference_steps=1)  # noqa: E731
    pipe(**inputs())
    monkeypatch.undo()
    cap = _Capture(monkeypatch)
    with taca.enabled(pipe, gamma=1.3, schedule="constant"):
        pipe(**inputs())
    for a, b in zip(stock["qkv"], cap.calls[0][:3]):
        assert torch.equal(a, b)


def test_per_sample_gamma_mixed_timesteps():
    """A batch mixing timesteps (training): each sample gets its own gamma, and each sample's
    output equals running it alone."""
    t = tiny.flux_transformer()
    g = torch.Generator().manual_seed(3)
    B, L, n = 3, 6, 16
    kw = dict(
        hidden_states=torch.randn(B, n, 4, generator=g),
        encoder_hidden_states=torch.randn(B, L, 32, generator=g),
        pooled_projections=torch.randn(B, 32, generator=g),
        timestep=torch.tensor([1.0, 0.5, 0.98]),
        img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(L, 3), return_dict=False,
    )
    kw["img_ids"][:, 1] = torch.arange(n) // 4
    kw["img_ids"][:, 2] = torch.arange(n) % 4
    h = taca.enable(t, gamma=1.25)
    try:
        out = t(**kw)[0]
        assert h.last_gamma.tolist() == [1.25, 1.0, 1.25]
        singles = []
        for b in range(B):
            kb = dict(kw)
            for key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
                kb[key] = kw[key][b : b + 1]
            singles.append(t(**kb)[0])
    finally:
        taca.disable(t)
    stock_b1 = t(**{**kw, **{k: kw[k][1:2] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")}})[0]
    torch.testing.assert_close(out, torch.cat(singles), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(singles[1], stock_b1, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(singles[0], t(**{**kw, **{k: kw[k][0:1] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")}})[0])


@pytest.mark.parametrize("kind", ["flux", "sd35m"])
def test_telemetry_events(kind):
    pipe = _pipe(kind)
    events = []
    taca.enable(pipe, gamma=1.2, backend="reference")  # paper rule: step 0 of 4 is in the window
    try:
        with telemetry.recording(events.append):
            pipe(**_inputs(pipe, kind, batch=1, text_len=5, num_inference_steps=2))
    finally:
        taca.disable(pipe)
    t = pipe.transformer
    if kind == "flux":
        names = [f"transformer_blocks.{i}.attn" for i in range(t.config.num_layers)]
        names += [f"single_transformer_blocks.{i}.attn" for i in range(t.config.num_single_layers)]
        B = 1
    else:
        names = [f"transformer_blocks.{i}.attn" for i in range(t.config.num_layers)]
        B = 2
    assert [e.name for e in events] == names * 2
    for j, e in enumerate(events):
        step = j // len(names)
        assert e.text_len == 5 and e.text_first == (kind == "flux")
        assert e.q.shape[0] == B and e.q.shape == e.k.shape and e.lse.shape == e.q.shape[:3]
        assert e.text_mass.shape == e.q.shape[:3]
        assert torch.all((e.text_mass >= 0) & (e.text_mass <= 1 + 1e-6))
        assert e.gamma.dtype == torch.float32 and e.gamma.shape == (B,)
        assert torch.all(e.gamma == (1.2 if step == 0 else 1.0)), (step, e.gamma)
        # lse is the log-partition of the gamma-scaled logits of these q, k
        qd, kd = e.q.double(), e.k.double()
        logits = qd @ kd.transpose(-1, -2) * e.scale
        N = logits.shape[-1]
        tx = slice(0, e.text_len) if e.text_first else slice(N - e.text_len, N)
        vis = torch.ones(N, dtype=torch.bool)
        vis[tx] = False
        logits[:, :, vis, tx] *= e.gamma.double().view(-1, 1, 1, 1)
        torch.testing.assert_close(e.lse.double(), torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
        tm = torch.softmax(logits, -1)[..., tx].sum(-1)
        torch.testing.assert_close(e.text_mass.double(), tm, rtol=1e-5, atol=1e-5)


def test_processor_errors_name_the_argument():
    t = tiny.flux_transformer(num_layers=0, num_single_layers=1)
    attn = t.single_transformer_blocks[0].attn
    p = TacaFluxAttnProcessor("single_transformer_blocks.0.attn")
    hs = torch.randn(1, 5, attn.query_dim if hasattr(attn, "query_dim") else 32)
    with pytest.raises(ValueError, match="taca_text_len=9 exceeds sequence length 5"):
        p(attn, hs, None, None, None, taca_gamma=torch.tensor([1.2]), taca_text_len=9)
