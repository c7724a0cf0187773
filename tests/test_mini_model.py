"""taca.mini.model: MiniPipeline's trainer contract, save/load round trip, and TACA on it."""
import pytest
import torch

import taca
from taca.mini import data as D
from taca.mini import model as M


@pytest.fixture(scope="module")
def pipe():
    return M.build_pipeline(seed=0, transformer_config=M.TINY_TRANSFORMER_CONFIG, text_config=M.TINY_TEXT_CONFIG)


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def test_mini_config_is_small_enough_to_ship():
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        t = FluxTransformer2DModel(**M.MINI_TRANSFORMER_CONFIG)
        e = T5EncoderModel(T5Config(**M.MINI_TEXT_CONFIG))
    n = sum(p.numel() for p in t.parameters()) + sum(p.numel() for p in e.parameters())
    assert 2e6 < n and 2 * n <= 10 * 2 ** 20  # <= 10 MiB in bf16


def test_trainer_contract(pipe):
    caps = ["a red circle", "two blue squares and a green triangle", ""]
    cond = pipe.encode_text(caps)
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert cond["prompt_embeds"].shape == (3, D.TEXT_LEN, 32) and cond["pooled_prompt_embeds"].shape == (3, 32)
    assert torch.equal(cond["pooled_prompt_embeds"][2], torch.zeros(32))  # "" pools to zeros
    # per-sample: encoding one caption alone gives that row of the batch
    one = pipe.encode_text(caps[1:2])
    torch.testing.assert_close(one["prompt_embeds"][0], cond["prompt_embeds"][1], rtol=1e-5, atol=1e-5)
    x0 = D.render_caption(caps[:2], seed=0)
    lat = pipe.encode_images(x0)
    assert lat.shape == (2, 3, 32, 32) and torch.equal(lat, x0)
    stacked = {k: torch.stack([v[0], v[1]]) for k, v in cond.items()}
    out = pipe.predict(lat, torch.tensor([0.3, 0.99]), stacked)
    assert out.shape == lat.shape and torch.isfinite(out).all()
    # predict passes sigma as FLUX's timestep: the transformer sees it unchanged
    seen = {}
    h = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        pipe.predict(lat, torch.tensor([0.3, 0.99]), stacked)
    finally:
        h.remove()
    assert torch.equal(seen["timestep"], torch.tensor([0.3, 0.99]))
    assert seen["encoder_hidden_states"].shape == (2, D.TEXT_LEN, 32) and seen["hidden_states"].shape == (2, 256, 12)
    with pytest.raises(ValueError, match="cond has batch 3"):
        pipe.predict(lat, torch.tensor([0.3, 0.99]), cond)


def test_pack_unpack_inverse():
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(M.unpack(M.pack(x), 32, 32), x)
    assert M.pack(x).shape == (2, 256, 12)


def test_call_output_types(pipe):
    kw = dict(num_inference_steps=3, generator=_gens(2))
    lat = pipe(["a red circle", "three blue squares"], output_type="latent", **kw).images
    pt = pipe(["a red circle", "three blue squares"], output_type="pt", guidance_scale=1.0, num_inference_steps=3,
              generator=_gens(2)).images
    assert lat.shape == (2, 3, 32, 32) and lat.min() >= -1 and lat.max() <= 1
    torch.testing.assert_close(pt, (lat + 1) / 2)
    pil = pipe("a red circle", num_inference_steps=2).images
    assert len(pil) == 1 and pil[0].size == (32, 32)
    with pytest.raises(ValueError, match="output_type='jpg'"):
        pipe("a red circle", output_type="jpg")


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = M.load_pipeline(str(tmp_path))
    assert type(loaded).__name__ == "MiniPipeline"
    caps = ["a purple triangle above a cyan circle", "two white squares"]
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    a = pipe(caps, generator=_gens(2), **kw).images
    b = loaded(caps, generator=_gens(2), **kw).images
    assert torch.equal(a, b)
    assert loaded.tokenize(caps)["input_ids"].tolist() == pipe.tokenize(caps)["input_ids"].tolist()


def test_taca_changes_only_the_steps_with_sigma_at_least_097_and_disable_restores(pipe):
    caps = ["a red circle to the left of a blue square", "three green triangles"]
    kw = dict(num_inference_steps=28, guidance_scale=1.0, output_type="latent")

    def run():
        calls = []
        orig = pipe.predict

        def rec(x, sigma, cond):
            out = orig(x, sigma, cond)
            calls.append((float(sigma[0]), out.clone()))
            return out

        pipe.predict = rec
        try:
            img = pipe(caps, generator=_gens(2), **kw).images
        finally:
            del pipe.predict
        return img, calls

    base, base_calls = run()
    taca.enable(pipe, gamma=1.2)
    try:
        on, on_calls = run()
    finally:
        taca.disable(pipe)
    off, off_calls = run()
    assert torch.equal(off, base)
    assert len(on_calls) == len(base_calls) == 28
    window = [s >= 0.97 for s, _ in base_calls]
    assert sum(window) == 3  # shift 3, 28 steps: the paper's window is the first 3 steps
    first_diff = next(i for i, ((_, a), (_, b)) in enumerate(zip(base_calls, on_calls)) if not torch.equal(a, b))
    assert first_diff == 0
    # the same input in a step outside the window gives bit-identical output: check predict directly
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cond = pipe.encode_text(caps)
    outs = {}
    for s in (0.99, 0.97, 0.9699, 0.5, 0.0):
        ref = pipe.predict(x, torch.full((2,), s), cond)
        with taca.enabled(pipe, gamma=1.2):
            got = pipe.predict(x, torch.full((2,), s), cond)
        outs[s] = torch.equal(ref, got)
    assert outs == {0.99: False, 0.97: False, 0.9699: True, 0.5: True, 0.0: True}
    assert not torch.equal(on, base)


def test_lora_loads_through_the_pipeline_and_taca_gates_it(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = M.build_pipeline(seed=1, transformer_config=M.TINY_TRANSFORMER_CONFIG, text_config=M.TINY_TEXT_CONFIG)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = pipe.encode_text(["a red circle"])

    def outs():
        return {s: pipe.predict(x, torch.full((1,), s), cond) for s in (0.99, 0.5)}

    ref = outs()
    with taca.enabled(pipe, gamma=1.2):
        gamma_only = outs()
    # a LoRA file in diffusers' pipeline format (keys "transformer.*"), what taca train writes
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v"]), adapter_name="t")
    sd = {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(pipe.transformer, adapter_name="t").items()}
    pipe.transformer.delete_adapters("t")
    save_file(sd, str(tmp_path / "pytorch_lora_weights.safetensors"))
    with taca.enabled(pipe, gamma=1.2, lora=str(tmp_path)):
        on = outs()
    assert not torch.equal(on[0.99], gamma_only[0.99])  # in the window: gamma and the LoRA
    assert torch.equal(on[0.5], ref[0.5])  # outside it: neither
    assert torch.equal(outs()[0.99], ref[0.99])  # and gone after
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", adapter_name="u")
    assert "u" in pipe.transformer.peft_config
    assert not torch.equal(outs()[0.5], ref[0.5])
