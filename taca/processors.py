"""diffusers attention processors that apply TACA: FLUX (``FluxAttention``) and SD3/SD3.5
(``JointAttnProcessor2_0`` semantics).

Each processor instance serves one attention module and knows its qualified name (for
telemetry). Per-call state arrives through ``joint_attention_kwargs``, injected by the forward
pre-hook of ``taca.enable``:

- ``taca_gamma``: (B,) float32 tensor on the device, or None when no sample of the batch is in
  the gamma window. None means the STOCK attention path, op for op (bit-identical to diffusers'
  own processor, no extra cost).
- ``taca_text_len``: the number of text tokens (FLUX single-stream blocks see only the joint
  sequence, so they need it; elsewhere it is ``encoder_hidden_states.shape[1]``).

While a telemetry recorder is active (``taca.telemetry.active()``) every joint attention goes
through ``taca.joint_attention(..., return_lse=True, return_text_mass=True)`` (with gamma 1
where TACA is off) and an :class:`~taca.telemetry.AttentionEvent` is emitted.

The parameters are named (diffusers drops kwargs that the processor's ``__call__`` does not
name) and never called ``scale`` (reserved for the LoRA scale).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import telemetry
from .ops import joint_attention


class _TacaProcessorBase:
    _attention_backend = None
    _parallel_config = None
    text_first: bool = True

    def __init__(self, name: str, gamma_reverse: float = 1.0, backend: str = "auto"):
        self.name = name
        self.gamma_reverse = float(gamma_reverse)
        self.backend = backend

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, gamma_reverse={self.gamma_reverse}, backend={self.backend!r})"

    def _joint(self, q, k, v, text_len: int, gamma: Optional[torch.Tensor], layout: str, record: bool):
        """TACA attention on q, k, v in ``layout``; returns out in the same layout."""
        if self._parallel_config is not None:
            raise NotImplementedError(
                f"taca: {self.name}: context parallelism is not supported while gamma is on"
            )
        B = q.shape[0]
        if gamma is None:
            gamma = torch.ones(B, device=q.device, dtype=torch.float32)
        D = q.shape[-1]
        scale = 1.0 / math.sqrt(D)
        if not record:
            return joint_attention(
                q, k, v, text_len=text_len, text_first=self.text_first, gamma=gamma,
                gamma_reverse=self.gamma_reverse, scale=scale, layout=layout, backend=self.backend,
            )
        out, lse, text_mass = joint_attention(
            q, k, v, text_len=text_len, text_first=self.text_first, gamma=gamma,
            gamma_reverse=self.gamma_reverse, scale=scale, layout=layout,
            return_lse=True, return_text_mass=True, backend=self.backend,
        )
        qb, kb = (q, k) if layout == "bhnd" else (q.transpose(1, 2), k.transpose(1, 2))
        telemetry.emit(telemetry.AttentionEvent(
            name=self.name, q=qb, k=kb, lse=lse, text_mass=text_mass, text_len=int(text_len),
            text_first=self.text_first, gamma=gamma.to(torch.float32), gamma_reverse=self.gamma_reverse,
            scale=scale,
        ))
        return out


class TacaFluxAttnProcessor(_TacaProcessorBase):
    """TACA for ``FluxAttention`` (FLUX.1, FLUX Kontext): text first, layout (B, N, H, D).

    Double-stream blocks (``encoder_hidden_states`` given) return ``(img, txt)``; single-stream
    blocks get the joint sequence and return it. QKV projections go through diffusers' own
    ``_get_qkv_projections`` (so ``fuse_qkv_projections`` works); QK RMSNorm and RoPE as stock.
    Attention masks are passed to the stock path only: TACA has no mask input.
    """

    text_first = True

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
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

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

        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
        else:
            text_len = taca_text_len
        record = telemetry.active() and text_len is not None
        if (taca_gamma is None and not record) or text_len is None:
            # parallel_config only where set: dispatch_attention_fn has it since diffusers 0.36
            extra = {} if self._parallel_config is None else {"parallel_config": self._parallel_config}
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, backend=self._attention_backend, **extra
            )
        else:
            if attention_mask is not None:
                raise NotImplementedError(f"taca: {self.name}: attention_mask is not supported while gamma is on")
            if text_len > query.shape[1]:
                raise ValueError(
                    f"taca: {self.name}: taca_text_len={text_len} exceeds sequence length {query.shape[1]}"
                )
            hidden_states = self._joint(query, key, value, text_len, taca_gamma, "bnhd", record)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class TacaJointAttnProcessor(_TacaProcessorBase):
    """TACA for SD3/SD3.5 ``Attention`` modules: image first, text last, layout (B, H, N, D).

    Same computation as diffusers' ``JointAttnProcessor2_0`` (and ``FusedJointAttnProcessor2_0``
    when the module's projections are fused): optional QK RMSNorm, ``attention_mask`` ignored,
    the ``context_pre_only`` last block still applies gamma (image queries see text keys) and
    returns no text projection. Modules called without ``encoder_hidden_states`` (SD3.5-Medium's
    image-only ``attn2``) get plain attention.
    """

    text_first = False

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        fused = getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv")

        if fused:
            qkv = attn.to_qkv(hidden_states)
            split_size = qkv.shape[-1] // 3
            query, key, value = torch.split(qkv, split_size, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            if fused and hasattr(attn, "to_added_qkv"):
                eqkv = attn.to_added_qkv(encoder_hidden_states)
                split_size = eqkv.shape[-1] // 3
                e_q, e_k, e_v = torch.split(eqkv, split_size, dim=-1)
            else:
                e_q = attn.add_q_proj(encoder_hidden_states)
                e_k = attn.add_k_proj(encoder_hidden_states)
                e_v = attn.add_v_proj(encoder_hidden_states)
            e_q = e_q.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            e_k = e_k.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            e_v = e_v.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                e_q = attn.norm_added_q(e_q)
            if attn.norm_added_k is not None:
                e_k = attn.norm_added_k(e_k)
            query = torch.cat([query, e_q], dim=2)
            key = torch.cat([key, e_k], dim=2)
            value = torch.cat([value, e_v], dim=2)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        record = telemetry.active() and text_len is not None
        if (taca_gamma is None and not record) or text_len is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        else:
            hidden_states = self._joint(query, key, value, text_len, taca_gamma, "bhnd", record)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
