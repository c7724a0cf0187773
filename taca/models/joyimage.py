"""JoyImage Edit and JoyImage Edit Plus: ``JoyImageEditTransformer3DModel`` (``JoyImageAttention``,
``JoyImageAttnProcessor``) and ``JoyImageEditPlusTransformer3DModel`` (``JoyImageEditPlusAttention``,
``JoyImageEditPlusAttnProcessor``).

Double-stream blocks only, every one joint: the processor concatenates ``[img, txt]`` (layout
(B, N, H, D)), so the text is the last ``encoder_hidden_states.shape[1]`` tokens of each call.

- JoyImage Edit: the image stream holds every item of a multi-item input, the target first, then
  the reference images along the frame axis (the model moves the target, the pipeline's last item,
  to the front); the attention takes no mask (``attn_mask=None``), so the prompt's zero padding (the
  pipeline pads the batch's prompts to one length) is text and is scaled as the stock model attends
  it. RoPE on the image stream, and on the text stream with ``rope_type="mrope"``.
- JoyImage Edit Plus: the image stream is one flat patch sequence per sample, target then reference
  patches, zero-padded to the batch's ``max_patches``; with ``encoder_hidden_states_mask`` the model
  passes a bool key mask (B, 1, 1, N) that removes the padded patch slots and the padded text, kept
  as is (the padded slots still query: image-stream queries, their outputs discarded by the
  pipeline). Batched (per-sample) RoPE on the image stream.

Reference-image tokens are visual: their queries get gamma on the text keys, as the target's do
(as FLUX Kontext and Qwen-Image-Edit here). The blocks forward no attention kwargs: the hook hands
the processors their state. Timestep: the pipelines pass the scheduler's t = 1000 sigma.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..processors import TacaProcessor
from . import Adapter, register


def _joint_qkv(attn, hidden_states, encoder_hidden_states):
    """The stock processors' shared part: fused QKV per stream, split, heads, QK RMSNorm."""
    heads = attn.heads
    img_query, img_key, img_value = attn.img_attn_qkv(hidden_states).chunk(3, dim=-1)
    txt_query, txt_key, txt_value = attn.txt_attn_qkv(encoder_hidden_states).chunk(3, dim=-1)

    img_query = img_query.unflatten(-1, (heads, -1))
    img_key = img_key.unflatten(-1, (heads, -1))
    img_value = img_value.unflatten(-1, (heads, -1))

    txt_query = txt_query.unflatten(-1, (heads, -1))
    txt_key = txt_key.unflatten(-1, (heads, -1))
    txt_value = txt_value.unflatten(-1, (heads, -1))

    img_query = attn.img_attn_q_norm(img_query)
    img_key = attn.img_attn_k_norm(img_key)
    txt_query = attn.txt_attn_q_norm(txt_query)
    txt_key = attn.txt_attn_k_norm(txt_key)
    return img_query, img_key, img_value, txt_query, txt_key, txt_value


class _TacaJoyImageBase(TacaProcessor):
    text_first = False  # [img, txt]
    layout = "bnhd"

    def _attend(self, attn, hidden_states, img, txt, attention_mask):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        img_query, img_key, img_value = img
        txt_query, txt_key, txt_value = txt
        joint_query = torch.cat([img_query, txt_query], dim=1)
        joint_key = torch.cat([img_key, txt_key], dim=1)
        joint_value = torch.cat([img_value, txt_value], dim=1)

        out = self.taca_attention(joint_query, joint_key, joint_value, txt_key.shape[1], self.call_arg("taca_gamma"),
                                  attention_mask)
        if out is None:
            out = dispatch_attention_fn(
                joint_query,
                joint_key,
                joint_value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )

        joint_hidden_states = out.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)

        img_attn_output = joint_hidden_states[:, : hidden_states.shape[1], :]
        txt_attn_output = joint_hidden_states[:, hidden_states.shape[1] :, :]

        img_attn_output = attn.img_attn_proj(img_attn_output)
        txt_attn_output = attn.txt_attn_proj(txt_attn_output)
        return img_attn_output, txt_attn_output


class TacaJoyImageAttnProcessor(_TacaJoyImageBase):
    """TACA for JoyImage Edit: ``JoyImageAttnProcessor`` op for op (no mask)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.transformers.transformer_joyimage import _apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError("JoyImageAttnProcessor requires encoder_hidden_states (text stream)")
        img_query, img_key, img_value, txt_query, txt_key, txt_value = _joint_qkv(attn, hidden_states,
                                                                                  encoder_hidden_states)
        if image_rotary_emb is not None:
            vis_freqs, txt_freqs = image_rotary_emb
            if vis_freqs is not None:
                img_query, img_key = _apply_rotary_emb(img_query, img_key, vis_freqs)
            if txt_freqs is not None:
                txt_query, txt_key = _apply_rotary_emb(txt_query, txt_key, txt_freqs)
        return self._attend(attn, hidden_states, (img_query, img_key, img_value), (txt_query, txt_key, txt_value),
                            None)


class TacaJoyImageEditPlusAttnProcessor(_TacaJoyImageBase):
    """TACA for JoyImage Edit Plus: ``JoyImageEditPlusAttnProcessor`` op for op (batched RoPE, the
    stock bool key mask)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.transformers.transformer_joyimage_edit_plus import _apply_rotary_emb_batched

        if encoder_hidden_states is None:
            raise ValueError("JoyImageEditPlusAttnProcessor requires encoder_hidden_states")
        img_query, img_key, img_value, txt_query, txt_key, txt_value = _joint_qkv(attn, hidden_states,
                                                                                  encoder_hidden_states)
        if image_rotary_emb is not None:
            img_query, img_key = _apply_rotary_emb_batched(img_query, img_key, image_rotary_emb)
        return self._attend(attn, hidden_states, (img_query, img_key, img_value), (txt_query, txt_key, txt_value),
                            attention_mask)


@register
class JoyImageAdapter(Adapter):
    name = "joyimage"
    label = "JoyImageEditTransformer3DModel (JoyImage Edit)"
    transformer_classes = ("JoyImageEditTransformer3DModel",)
    stock_processors = frozenset({"JoyImageAttnProcessor"})
    timestep = "t1000"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    pipeline_t_is_1000_sigma = False  # the pipelines set no _current_timestep
    # the edit pipeline also runs from a prompt alone (image=None: one item, text to image)
    pipelines = ("JoyImageEditPipeline",)
    negative_prompt = True
    max_sequence_length = 4096

    def processor(self, name, module):
        return TacaJoyImageAttnProcessor(name)


@register
class JoyImageEditPlusAdapter(Adapter):
    name = "joyimage_edit_plus"
    label = "JoyImageEditPlusTransformer3DModel (JoyImage Edit Plus)"
    transformer_classes = ("JoyImageEditPlusTransformer3DModel",)
    stock_processors = frozenset({"JoyImageEditPlusAttnProcessor"})
    timestep = "t1000"
    kwargs_name = None
    pipeline_t_is_1000_sigma = False
    pipelines = ("JoyImageEditPlusPipeline",)  # images=None: the target alone, text to image
    negative_prompt = True
    max_sequence_length = 4096

    def processor(self, name, module):
        return TacaJoyImageEditPlusAttnProcessor(name)
