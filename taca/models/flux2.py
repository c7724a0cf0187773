"""FLUX.2 (dev, klein): ``Flux2Transformer2DModel``.

Double-stream blocks: ``Flux2Attention`` with ``Flux2AttnProcessor``; single-stream blocks:
``Flux2ParallelSelfAttention`` with ``Flux2ParallelSelfAttnProcessor`` (QKV and the MLP input in
one projection, attention output and MLP output in one). Text first ([txt, img], layout
(B, N, H, D)); edit reference latents are appended after the image (``[txt, img, ref]``): they
are visual tokens, so gamma applies to their queries on text keys. The single-stream processor
sees only the joint sequence: the hook injects ``taca_text_len``. The transformer takes sigma in
[0, 1] (the pipelines pass ``t / 1000`` in the latents' dtype).

Klein-KV (``Flux2KleinKVPipeline``) installs ``Flux2KVAttnProcessor`` /
``Flux2KVParallelSelfAttnProcessor``; TACA replaces them with processors that keep their cache
modes (diffusers' ``_flux2_kv_causal_attention``):

- "extract" (step 0, with reference images): the sequence is [txt, ref, img]; the ref K/V are
  stored; [txt, img] queries attend all [txt, ref, img] keys (TACA: text keys [0, T), text queries
  the first T of the [txt, img] queries; img queries get gamma on the text keys, text queries
  gamma_reverse on ref and img keys), ref queries attend only the ref keys (no text: stock).
- "cached" (later steps): the sequence is [txt, img]; keys [txt, cached ref, img] (TACA: the
  same spans, N_q = T + I queries on N_k = T + R + I keys).
- no mode (no reference image): Flux2AttnProcessor's computation, as stock.

Outside the window every mode runs diffusers' own code, op for op.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, register

_KV = frozenset({"Flux2KVAttnProcessor", "Flux2KVParallelSelfAttnProcessor"})


def _dispatch(self, query, key, value, attention_mask):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                 parallel_config=self._parallel_config)


def _double_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Stock ``Flux2AttnProcessor``'s q, k, v (B, N, H, D): [txt, img] with QK-norm and RoPE."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

    query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
        attn, hidden_states, encoder_hidden_states
    )
    query = query.unflatten(-1, (-1, attn.head_dim))
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))
    query = attn.norm_q(query)
    key = attn.norm_k(key)

    if attn.added_kv_proj_dim is not None:
        encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
        encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        encoder_query = attn.norm_added_q(encoder_query)
        encoder_key = attn.norm_added_k(encoder_key)
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)

    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


def _double_out(attn, hidden_states, encoder_hidden_states, dtype):
    """Stock ``Flux2AttnProcessor``'s output: split [txt, img], project; ``(img, txt)`` or ``img``."""
    hidden_states = hidden_states.flatten(2, 3)
    hidden_states = hidden_states.to(dtype)

    if encoder_hidden_states is not None:
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)

    if encoder_hidden_states is not None:
        return hidden_states, encoder_hidden_states
    return hidden_states


def _single_qkv(attn, hidden_states, image_rotary_emb):
    """Stock ``Flux2ParallelSelfAttnProcessor``'s q, k, v (B, N, H, D) and its MLP branch input."""
    from diffusers.models.embeddings import apply_rotary_emb

    hidden_states = attn.to_qkv_mlp_proj(hidden_states)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
    query, key, value = qkv.chunk(3, dim=-1)
    query = query.unflatten(-1, (-1, attn.head_dim))
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))
    query = attn.norm_q(query)
    key = attn.norm_k(key)

    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value, mlp_hidden_states


def _single_out(attn, attn_output, mlp_hidden_states, dtype):
    """Stock ``Flux2ParallelSelfAttnProcessor``'s output: attention and MLP branches, one projection."""
    attn_output = attn_output.flatten(2, 3)
    attn_output = attn_output.to(dtype)
    mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=-1)
    return attn.to_out(hidden_states)


class TacaFlux2AttnProcessor(TacaProcessor):
    """TACA for ``Flux2Attention`` (double-stream): returns ``(img, txt)``, as stock."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        query, key, value = _double_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else taca_text_len
        hidden_states = self.taca_attention(query, key, value, text_len, taca_gamma, attention_mask)
        if hidden_states is None:
            hidden_states = _dispatch(self, query, key, value, attention_mask)
        return _double_out(attn, hidden_states, encoder_hidden_states, query.dtype)


def _kv_attention(proc, query, key, value, num_txt_tokens, num_ref_tokens, kv_cache, gamma):
    """``_flux2_kv_causal_attention`` (diffusers) with TACA on the [txt, img] queries: "extract"
    (``kv_cache`` None, ``num_ref_tokens`` > 0) or "cached" (``kv_cache`` given). Stock when the
    processor's ``taca_attention`` says so (gamma off and nothing recorded) or there is no text."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_flux2 import _flux2_kv_causal_attention

    T = num_txt_tokens
    text_len = T if T > 0 else None  # no text: nothing to scale, the stock call
    if kv_cache is not None:
        # cached: [txt, img] queries on [txt, ref cache, img] keys
        k_ref, v_ref = kv_cache.get()
        k_all = torch.cat([key[:, :T], k_ref, key[:, T:]], dim=1)
        v_all = torch.cat([value[:, :T], v_ref, value[:, T:]], dim=1)
        out = proc.taca_attention(query, k_all, v_all, text_len, gamma, query_text_start=0, query_text_len=T)
        if out is None:
            return _flux2_kv_causal_attention(query, key, value, T, 0, kv_cache=kv_cache,
                                              backend=proc._attention_backend)
        return out
    # extract: [txt, ref, img]; [txt, img] queries attend every key, ref queries only the ref keys
    R = num_ref_tokens
    q_txt_img = torch.cat([query[:, :T], query[:, T + R:]], dim=1)
    out = proc.taca_attention(q_txt_img, key, value, text_len, gamma, query_text_start=0, query_text_len=T)
    if out is None:
        return _flux2_kv_causal_attention(query, key, value, T, R, backend=proc._attention_backend)
    attn_ref = dispatch_attention_fn(query[:, T:T + R], key[:, T:T + R], value[:, T:T + R],
                                     backend=proc._attention_backend)
    return torch.cat([out[:, :T], attn_ref, out[:, T:]], dim=1)


def _kv_modes(proc, query, key, value, T, num_ref_tokens, kv_cache, kv_cache_mode, gamma):
    """The Klein-KV processors' cache step and attention: stores the ref K / V in "extract" mode,
    then the extract / cached attention; None without a cache mode (the caller's plain call)."""
    if kv_cache_mode == "extract" and kv_cache is not None and num_ref_tokens > 0:
        kv_cache.store(key[:, T:T + num_ref_tokens].clone(), value[:, T:T + num_ref_tokens].clone())
    if kv_cache_mode == "extract" and num_ref_tokens > 0:
        return _kv_attention(proc, query, key, value, T, num_ref_tokens, None, gamma)
    if kv_cache_mode == "cached" and kv_cache is not None:
        return _kv_attention(proc, query, key, value, T, 0, kv_cache, gamma)
    return None


class TacaFlux2KVAttnProcessor(TacaProcessor):
    """TACA for ``Flux2Attention`` under ``Flux2KVAttnProcessor`` (Klein-KV, double-stream): its
    extract / cached modes with TACA (see the module docstring); without a mode, as
    :class:`TacaFlux2AttnProcessor`."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        kv_cache=None,
        kv_cache_mode: Optional[str] = None,
        num_ref_tokens: int = 0,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        query, key, value = _double_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        num_txt_tokens = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        hidden_states = _kv_modes(self, query, key, value, num_txt_tokens, num_ref_tokens, kv_cache,
                                  kv_cache_mode, taca_gamma)
        if hidden_states is None:
            text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else taca_text_len
            hidden_states = self.taca_attention(query, key, value, text_len, taca_gamma, attention_mask)
            if hidden_states is None:
                hidden_states = _dispatch(self, query, key, value, attention_mask)
        return _double_out(attn, hidden_states, encoder_hidden_states, query.dtype)


class TacaFlux2ParallelSelfAttnProcessor(TacaProcessor):
    """TACA for ``Flux2ParallelSelfAttention`` (single-stream): the text length comes from the
    hook (``taca_text_len``)."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        query, key, value, mlp_hidden_states = _single_qkv(attn, hidden_states, image_rotary_emb)
        out = self.taca_attention(query, key, value, taca_text_len, taca_gamma, attention_mask)
        if out is None:
            out = _dispatch(self, query, key, value, attention_mask)
        return _single_out(attn, out, mlp_hidden_states, query.dtype)


class TacaFlux2KVParallelSelfAttnProcessor(TacaProcessor):
    """TACA for ``Flux2ParallelSelfAttention`` under ``Flux2KVParallelSelfAttnProcessor`` (Klein-KV,
    single-stream): the text length is the transformer's ``num_txt_tokens`` in the cache modes,
    the hook's ``taca_text_len`` without one."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        kv_cache=None,
        kv_cache_mode: Optional[str] = None,
        num_txt_tokens: int = 0,
        num_ref_tokens: int = 0,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        query, key, value, mlp_hidden_states = _single_qkv(attn, hidden_states, image_rotary_emb)
        out = _kv_modes(self, query, key, value, num_txt_tokens, num_ref_tokens, kv_cache, kv_cache_mode,
                        taca_gamma)
        if out is None:
            out = self.taca_attention(query, key, value, taca_text_len, taca_gamma, attention_mask)
            if out is None:
                out = _dispatch(self, query, key, value, attention_mask)
        return _single_out(attn, out, mlp_hidden_states, query.dtype)


@register
class Flux2Adapter(Adapter):
    name = "flux2"
    label = "Flux2Transformer2DModel (FLUX.2 dev, klein)"
    transformer_classes = ("Flux2Transformer2DModel",)
    stock_processors = frozenset({"Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"}) | _KV
    timestep = "sigma"
    # diffusers 0.42.1: _current_timestep = t, then timestep = t.expand(B).to(latents.dtype) / 1000
    current_t_pipelines = frozenset({"Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline",
                                     "Flux2KleinKVPipeline"})
    # Flux2KleinKVPipeline is served by taca.enable, not taca generate: its __call__ takes no guidance
    pipelines = ("Flux2Pipeline", "Flux2KleinPipeline")

    def processor(self, name, module):
        from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttention

        kv = type(module.processor).__name__ in _KV
        if isinstance(module, Flux2ParallelSelfAttention):
            return (TacaFlux2KVParallelSelfAttnProcessor if kv else TacaFlux2ParallelSelfAttnProcessor)(name)
        return (TacaFlux2KVAttnProcessor if kv else TacaFlux2AttnProcessor)(name)
