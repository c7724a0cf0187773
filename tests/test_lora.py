"""LoRA gating: a TACA LoRA (made here with peft, saved in diffusers' format) is active exactly in
the transformer calls where gamma != 1, repeated pipeline calls behave the same, and the user's
other adapters are left alone."""
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import taca
import taca.pipeline
from taca import tiny

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _make_lora(kind, tmp_path, seed=5):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny.flux_pipeline() if kind == "flux" else tiny.sd3_pipeline("sd35m")
    t = pipe.transformer
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name="made")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    sd = get_peft_model_state_dict(t, adapter_name="made")
    type(pipe).save_lora_weights(str(tmp_path), transformer_lora_layers=sd)
    assert os.listdir(tmp_path) == ["pytorch_lora_weights.safetensors"]
    return str(tmp_path)


class _Steps:
    """Records every transformer call: the kwargs as the pipeline passed them and the output."""

    def __init__(self, t):
        self.calls = []
        self.h1 = t.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
        self.h2 = t.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, m, args, kwargs):
        self.calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

    def _post(self, m, args, kwargs, out):
        self.calls[-1]["_out"] = out[0].clone()

    def remove(self):
        self.h1.remove()
        self.h2.remove()


def _call(t, kw):
    kw = {k: v for k, v in kw.items() if k != "_out"}
    kw["return_dict"] = False
    return t(**kw)[0]


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_lora_active_exactly_in_taca_steps(kind, tmp_path):
    path = _make_lora(kind, tmp_path)
    pipe = tiny.flux_pipeline() if kind == "flux" else tiny.sd3_pipeline("sd35m")
    inputs = (lambda: tiny.flux_inputs(pipe, batch=1, text_len=6, num_inference_steps=4)) if kind == "flux" else (
        lambda: tiny.sd3_inputs(pipe, batch=1, text_len=6, num_inference_steps=4))
    stock = pipe(**inputs()).images
    taca.enable(pipe, gamma=1.2, schedule="steps:2", lora=path)
    rec = _Steps(pipe.transformer)
    try:
        first = pipe(**inputs()).images
        calls1 = list(rec.calls)
        rec.calls.clear()
        second = pipe(**inputs()).images
        calls2 = list(rec.calls)
    finally:
        rec.remove()
        taca.disable(pipe)
    assert torch.equal(first, second)
    assert len(calls1) == len(calls2) == 4
    for a, b in zip(calls1, calls2):
        assert torch.equal(a["_out"], b["_out"])
    assert "taca" not in (pipe.transformer.peft_config if hasattr(pipe.transformer, "peft_config") else {})
    assert torch.equal(pipe(**inputs()).images, stock)

    # references: (a) adapter always on + TACA always on; (b) no adapter, no TACA
    ref_on = tiny.flux_pipeline() if kind == "flux" else tiny.sd3_pipeline("sd35m")
    ref_on.load_lora_weights(path, weight_name="pytorch_lora_weights.safetensors", adapter_name="always")
    taca.enable(ref_on, gamma=1.2, schedule="constant")
    ref_off = tiny.flux_pipeline() if kind == "flux" else tiny.sd3_pipeline("sd35m")
    taca_only = tiny.flux_pipeline() if kind == "flux" else tiny.sd3_pipeline("sd35m")
    taca.enable(taca_only, gamma=1.2, schedule="constant")
    for i, c in enumerate(calls1):
        if i < 2:
            torch.testing.assert_close(c["_out"], _call(ref_on.transformer, c), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(c["_out"], _call(taca_only.transformer, c), atol=1e-4)  # the LoRA matters
        else:
            assert torch.equal(c["_out"], _call(ref_off.transformer, c))


def test_lora_by_name_state_dict_and_other_adapters(tmp_path):
    """lora= an already loaded adapter name or a state dict; the user's own adapter stays active
    in every step and keeps its requires_grad; disable gives the named adapter back its activity."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    path = _make_lora("flux", tmp_path)
    pipe = tiny.flux_pipeline()
    t = pipe.transformer
    t.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["proj_out"], init_lora_weights=False), adapter_name="user")
    user_params = [p for n, p in t.named_parameters() if ".user." in n or n.endswith(".user.weight")]
    assert user_params
    for p in user_params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    n, L = 16, 4
    kw = dict(hidden_states=torch.randn(1, n, 4, generator=g), encoder_hidden_states=torch.randn(1, L, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.rand(n, 3, generator=g),
              txt_ids=torch.zeros(L, 3))
    user_only_off = _call(t, {**kw, "timestep": torch.tensor([0.5])})

    sd = load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))
    with warnings.catch_warnings(record=True) as caught:  # joining the user's adapter is intended: no noise
        warnings.simplefilter("always")
        h = taca.enable(pipe, gamma=1.2, lora=sd)
    assert not [w for w in caught if "peft_config" in str(w.message)], [str(w.message) for w in caught]
    try:
        off = _call(t, {**kw, "timestep": torch.tensor([0.5])})
        on = _call(t, {**kw, "timestep": torch.tensor([1.0])})
        assert h._lora_on is True
        assert all(p.requires_grad for p in user_params)
        proj_layers = [m for name, m in t.named_modules() if name.endswith("proj_out") and hasattr(m, "active_adapters")]
        assert proj_layers and all("user" in m.active_adapters for m in proj_layers)
    finally:
        taca.disable(pipe)
    assert torch.equal(off, user_only_off)
    assert "taca" not in t.peft_config and "user" in t.peft_config
    assert all(m.active_adapters == ["user"] for m in proj_layers)
    assert torch.equal(_call(t, {**kw, "timestep": torch.tensor([0.5])}), user_only_off)

    # by name: an adapter the user loaded (active); gated while enabled, active again after
    with warnings.catch_warnings():  # peft's note on a second adapter: this test means to add one
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        pipe.load_lora_weights(path, weight_name="pytorch_lora_weights.safetensors", adapter_name="mine")
    mine_layers = [m for _, m in t.named_modules() if hasattr(m, "lora_A") and "mine" in m.lora_A]
    for _, m in t.named_modules():  # loading deactivates "user"; the user turns both on
        if hasattr(m, "lora_A") and len(m.lora_A):
            m.set_adapter(sorted(m.lora_A.keys()))
    assert all(m.active_adapters == ["user"] for m in proj_layers)
    always_on = _call(t, {**kw, "timestep": torch.tensor([0.5])})
    with taca.enabled(pipe, gamma=1.2, lora="mine"):
        assert torch.equal(_call(t, {**kw, "timestep": torch.tensor([0.5])}), user_only_off)
        torch.testing.assert_close(_call(t, {**kw, "timestep": torch.tensor([1.0])}), on, rtol=1e-5, atol=1e-6)
    assert "mine" in t.peft_config and all("mine" in m.active_adapters for m in mine_layers)
    assert torch.equal(_call(t, {**kw, "timestep": torch.tensor([0.5])}), always_on)


def test_mixed_batch_lora_is_on_if_any_sample_is_in_window(tmp_path):
    path = _make_lora("flux", tmp_path)
    t = tiny.flux_transformer()
    h = taca.enable(t, gamma=1.2, lora=path)
    g = torch.Generator().manual_seed(0)
    n, L = 16, 4
    kw = dict(hidden_states=torch.randn(2, n, 4, generator=g), encoder_hidden_states=torch.randn(2, L, 32, generator=g),
              pooled_projections=torch.randn(2, 32, generator=g), img_ids=torch.rand(n, 3, generator=g),
              txt_ids=torch.zeros(L, 3))
    try:
        _call(t, {**kw, "timestep": torch.tensor([1.0, 0.3])})
        assert h._lora_on is True and h.last_gamma.tolist() == pytest.approx([1.2, 1.0])
        _call(t, {**kw, "timestep": torch.tensor([0.6, 0.3])})
        assert h._lora_on is False and h.last_gamma is None
    finally:
        taca.disable(t)


def test_lora_gating_refuses_a_diffusers_cache(tmp_path):
    """A LoRA gated by step under a diffusers cache would reuse what the cache stored with the adapter on in
    the steps where it is off (Nucleus-Image's text K / V cache: seen to leak 0.62 against a LoRA effect of
    0.72): taca.enable(lora=) refuses a cached transformer before loading anything, and a cache enabled
    after taca.enable stops the pipeline at the gate's first flip. TACA without a LoRA runs under a cache."""
    from diffusers import FirstBlockCacheConfig

    path = _make_lora("flux", tmp_path)
    pipe = tiny.flux_pipeline()
    t = pipe.transformer
    t.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(ValueError, match="lora=: the transformer has a diffusers cache enabled \\(FirstBlockCacheConfig\\)"):
        taca.enable(pipe, gamma=1.2, lora=path)
    assert not getattr(t, "peft_config", None) and taca.pipeline.get_handle(pipe) is None  # nothing loaded, TACA off
    with taca.enabled(pipe, gamma=1.2, schedule="steps:2"):  # no LoRA: fine
        assert torch.isfinite(pipe(**tiny.flux_inputs(pipe, batch=1, text_len=6, num_inference_steps=4)).images).all()
    t.disable_cache()
    taca.enable(pipe, gamma=1.2, schedule="steps:2", lora=path)
    t.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    try:
        with pytest.raises(ValueError, match="diffusers cache enabled"):
            pipe(**tiny.flux_inputs(pipe, batch=1, text_len=6, num_inference_steps=4))
    finally:
        t.disable_cache()
        taca.disable(pipe)
