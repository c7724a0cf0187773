"""MiniMax-H3: ``MiniMaxH3Transformer3DModel``, ``MiniMaxH3Attention`` modules with ``MiniMaxH3AttnProcessor``.

One packed sequence per call, full self-attention (56 heads x 128 in the checkpoint, layout
(B, N, H, D)); the batch axis only replicates one layout. The modular pipelines pack
``[txt | conditioning video rows (keyframes / reference blocks) | audio rows | target video rows]``
(modular_pipelines/minimax_h3/before_denoise.py): text FIRST, ``text_indices`` = the first
``encoder_hidden_states.shape[1]`` rows. The text block is the text encoder's output as packed,
including the vision-block rows of a keyframe / reference that the encoder puts inside the prompt
(the model tags them as video for its AdaLN): they are text keys and text queries, as Qwen-Image-Edit's
vision tokens in its text stream.

What gets gamma: VIDEO queries (target rows and the conditioning / reference video rows: reference
tokens are visual) on the text keys. Audio queries are not visual and the paper's rule is about visual
queries: they keep their stock logits, as do the text queries. So each joint call runs the op on the
video rows (image-only queries against all keys, N_q != N_k) and diffusers' stock attention on the
other rows (text and audio) over the same keys, and scatters both back. ``gamma_reverse`` (text query x
visual key) would also need text x audio logits left alone, which the op cannot tell apart from text x
video ones in one call: a value other than 1 is refused (ValueError), not silently misapplied.

The token refiner (``token_refiner.refiner_blocks.*.attn``) uses the same processor class on the text
alone: it stays stock. No mask reaches attention (one document). Layout checks (one host sync per
transformer call, in the hook): the text rows must be the first ``L_txt`` positions and the video and
audio rows after them, otherwise the call is refused.

Sigma: the transformer gets the DISTINCT timesteps of the sequence (``timestep``, reversed:
1 - sigma in [0, 1], unscaled; ``MiniMaxH3Scheduler``: ``timesteps = 1 - sigmas``) and
``timestep_indices`` per row. Target video, target audio (its own schedule, shift 3 against the
video's 12) and conditioning rows (pinned at ``max(t, keyframe_noise_aug)`` / 1) carry different
values. The rule reads the generated VIDEO's sigma: the smallest timestep among the video rows (the
noisiest; conditioning rows are never noisier than the target). The checkpoint is guidance-distilled:
one forward per step, no CFG batch.

The blocks get no attention kwargs (``attention_kwargs`` only carries the LoRA scale): the hook
hands the processors their state. Telemetry recording is refused (N_q != N_k calls).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


class TacaMiniMaxH3AttnProcessor(TacaProcessor):
    """TACA for ``MiniMaxH3AttnProcessor`` in the joint blocks: the same projections, QK-norm, RoPE
    and output projection; the video rows' attention through :meth:`taca_attention`."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        rotary_emb=None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_minimax_h3 import _apply_rotary_emb

        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        def stock(q):
            return dispatch_attention_fn(
                q, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        hidden_states = self._joint(query, key, value, attention_mask, stock)
        if hidden_states is None:
            hidden_states = stock(query)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states

    def _joint(self, query, key, value, attention_mask, stock):
        """(B, N, H, D) with TACA on the video queries, or None: run the stock call."""
        text_len = self.call_arg("taca_text_len")
        gamma = self.call_arg("taca_gamma")
        vis = self.call_arg("taca_visual_rows")
        if not text_len or vis is None or vis.numel() == 0:
            return None
        if attention_mask is not None:
            raise NotImplementedError(
                f"taca: {self.name}: an attention_mask reached MiniMax-H3's joint attention (the model passes none: "
                f"one packed document); TACA supports the unmasked call only"
            )
        out_vis = self.taca_attention(query.index_select(1, vis), key, value, text_len, gamma)
        if out_vis is None:
            return None
        other = self.call_arg("taca_other_rows")
        out = out_vis.new_empty(query.shape)
        out.index_copy_(1, vis, out_vis)
        if other.numel():
            out.index_copy_(1, other, stock(query.index_select(1, other)))
        return out


@register
class MiniMaxH3Adapter(Adapter):
    name = "minimax_h3"
    label = "MiniMaxH3Transformer3DModel (MiniMax-H3)"
    transformer_classes = ("MiniMaxH3Transformer3DModel",)
    stock_processors = frozenset({"MiniMaxH3AttnProcessor"})
    timestep = "1-sigma"  # MiniMaxH3Scheduler: timesteps = 1 - sigmas, unscaled
    kwargs_name = None  # attention_kwargs carries only the LoRA scale; the blocks get no kwargs
    pipeline_t_is_1000_sigma = False
    pipelines = ()  # modular pipeline only (MiniMaxH3 modular blocks): taca.enable(transformer or pipe)

    def __init__(self, transformer):
        super().__init__(transformer)
        self._cached = None

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        # the token refiner's attention sees the text alone: stock
        return {n: m for n, m in attention_modules(self.transformer).items() if n.startswith("transformer_blocks.")}

    def processor(self, name, module):
        return TacaMiniMaxH3AttnProcessor(name)

    def _inspect(self, arg):
        # one inspection per transformer call, shared by timestep_value and call_state (the hook
        # hands both the same `arg` accessor; held here, so its identity is not reused meanwhile)
        if self._cached is not None and self._cached[0] is arg:
            return self._cached[1]
        ehs, text_idx = arg("encoder_hidden_states"), arg("text_indices")
        vid_idx, aud_idx = arg("video_indices"), arg("audio_indices")
        ts, ts_idx, pos = arg("timestep"), arg("timestep_indices"), arg("position_ids")
        if ehs is None or ts is None or ts_idx is None or vid_idx is None:
            raise ValueError("taca: MiniMax-H3: the transformer was called without encoder_hidden_states, timestep, "
                             "timestep_indices or video_indices")
        L = int(ehs.shape[1])
        N = int(pos.shape[0])
        aud_n = 0 if aud_idx is None else aud_idx.numel()
        if text_idx.numel() != L or L + vid_idx.numel() + aud_n != N:
            raise ValueError(
                f"taca: MiniMax-H3: {text_idx.numel()} text, {vid_idx.numel()} video and {aud_n} audio rows for "
                f"{L} text tokens and a sequence of {N}; TACA supports the packed layouts the MiniMax-H3 pipelines "
                f"build (every row text, video or audio, text first)"
            )
        if vid_idx.numel() == 0:
            raise ValueError("taca: MiniMax-H3: no video row in the call; TACA's rule reads the video's timestep")
        device = vid_idx.device
        big = torch.iinfo(torch.int64).max
        stats = torch.stack([
            text_idx.max() if L else torch.tensor(-1, device=device),
            vid_idx.min(),
            aud_idx.min() if aud_n else torch.tensor(big, device=device),
        ]).to(torch.float64)
        t_vid = ts.reshape(-1)[ts_idx.index_select(0, vid_idx)].min().to(device=device, dtype=torch.float64)
        vals = torch.cat([stats, t_vid.reshape(1)]).tolist()  # the one host sync of the call
        if L and (vals[0] >= L or vals[1] < L or vals[2] < L):
            raise ValueError(
                f"taca: MiniMax-H3: the text rows are not the first {L} rows of the packed sequence; TACA supports "
                f"the layouts the MiniMax-H3 pipelines build ([text | conditioning video | audio | target video])"
            )
        other = text_idx if not aud_n else torch.cat([text_idx, aud_idx])
        # the timestep as the tensor dtype holds it (the hook converts 1 - t in float32)
        t = torch.tensor(vals[3], dtype=ts.dtype).item()
        out = (L, t, vid_idx.to(torch.long), other.to(device=device, dtype=torch.long))
        self._cached = (arg, out)
        return out

    def timestep_value(self, arg):
        return self._inspect(arg)[1]

    def call_state(self, arg):
        L, _, vis, other = self._inspect(arg)
        self._cached = None
        blocks = getattr(self.transformer, "transformer_blocks", None)
        gr = getattr(blocks[0].attn.processor, "gamma_reverse", 1.0) if blocks else 1.0
        if gr != 1.0:
            raise ValueError(
                f"taca: MiniMax-H3: gamma_reverse={gr} is not supported: text queries attend video and audio keys "
                f"in one call and gamma_reverse would scale their audio logits too; use gamma_reverse=1"
            )
        return {"taca_text_len": L, "taca_visual_rows": vis, "taca_other_rows": other}
