"""Cosmos3: ``Cosmos3OmniTransformer``, ``Cosmos3PackedMoTAttention`` modules with ``Cosmos3AttnProcessor``.

One packed document per transformer call (no batch axis: the pipelines run one sample per call, CFG
as a second call): ``[und | gen]`` with und = the text prefix (``und_len`` tokens) and gen = the
generated modalities, in the pipelines ``[vision (conditioning frames, transfer control hints and the
noisy target), sound, action]``. Each layer's processor runs two attentions:

- und: the text queries against the text keys, causal (``is_causal=True``). Text only: stays stock.
- gen: the gen queries against ``K = [k_und_for_gen (the text), k_gen]`` (N_q != N_k; text FIRST
  among the keys), GQA (32 query / 8 KV heads in the checkpoint, ``enable_gqa=True``: the op reads
  the grouped KV heads as SDPA does, no copies). This is the joint call: TACA applies here.

What gets gamma: VISION queries (the noisy target and the clean conditioning / control-hint vision
tokens alike: reference tokens are visual, as for FLUX Kontext) on the text keys. Sound and action
queries are not visual, and the paper's rule is about visual queries: they keep their stock logits
(computed by a second, stock attention call over the same keys when a sound or action stream is in
the sequence; in text-to-image / video the gen stream is all vision and there is one call). No text
query ever sees a gen key (the und pathway is text-only), so ``gamma_reverse`` has nothing to act on:
a value other than 1 is refused (ValueError) rather than silently ignored.

Layout checks (one host sync per transformer call, in the hook, before any layer runs): und must be
exactly the text (``text_indexes`` = the ``und_len`` first positions, every vision / sound / action
index >= ``und_len``); otherwise the text keys would not be the und keys and the call is refused.

Sigma: the transformer gets per-token timesteps, ``vision_timesteps`` (and ``sound_timesteps`` /
``action_timesteps``) = the scheduler's t for the NOISY tokens only (clean conditioning frames get none),
times ``timestep_scale`` (0.001) inside. The rule reads the noisy target's t: all noisy tokens must
share one t (what ``Cosmos3OmniPipeline`` and the modular Cosmos3 blocks pass); differing per-token
timesteps are refused (ValueError: one gamma per sample). sigma = t * timestep_scale (``t1000`` for the
default 0.001). UniPC's flow timesteps are int64 ``floor(1000 sigma)``, so ``t >= 970`` exactly when the
scheduler's sigma >= 0.97.

The processors get no attention kwargs (``kwargs_name = None``): the hook hands them the state.
Telemetry recording is refused for these calls (queries are the gen tokens only, N_q != N_k).
"""
from __future__ import annotations

from typing import Dict

import torch

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


class TacaCosmos3AttnProcessor(TacaProcessor):
    """TACA for ``Cosmos3AttnProcessor``: op for op the same projections, norms, RoPE and output
    projections; the gen call's vision queries go through :meth:`taca_attention`."""

    text_first = True
    layout = "bnhd"

    def __call__(self, attn, und_seq: torch.Tensor, gen_seq: torch.Tensor, rotary_emb):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_cosmos3 import _rotate_half

        q_und = attn.to_q(und_seq).view(-1, attn.num_attention_heads, attn.head_dim)
        k_und = attn.to_k(und_seq).view(-1, attn.num_key_value_heads, attn.head_dim)
        v_und = attn.to_v(und_seq).view(-1, attn.num_key_value_heads, attn.head_dim)
        q_gen = attn.add_q_proj(gen_seq).view(-1, attn.num_attention_heads, attn.head_dim)
        k_gen = attn.add_k_proj(gen_seq).view(-1, attn.num_key_value_heads, attn.head_dim)
        v_gen = attn.add_v_proj(gen_seq).view(-1, attn.num_key_value_heads, attn.head_dim)

        q_und = attn.norm_q(q_und)
        k_und = attn.norm_k(k_und)
        k_und_for_gen = attn.k_norm_und_for_gen(k_und) if attn.k_norm_und_for_gen is not None else k_und
        q_gen = attn.norm_added_q(q_gen)
        k_gen = attn.norm_added_k(k_gen)

        cos_und, sin_und, cos_gen, sin_gen = rotary_emb
        cos_und = cos_und.unsqueeze(1)
        sin_und = sin_und.unsqueeze(1)
        q_und = q_und * cos_und + _rotate_half(q_und) * sin_und
        k_und = k_und * cos_und + _rotate_half(k_und) * sin_und
        k_und_for_gen = k_und_for_gen * cos_und + _rotate_half(k_und_for_gen) * sin_und
        cos_gen = cos_gen.unsqueeze(1)
        sin_gen = sin_gen.unsqueeze(1)
        q_gen = q_gen * cos_gen + _rotate_half(q_gen) * sin_gen
        k_gen = k_gen * cos_gen + _rotate_half(k_gen) * sin_gen

        # und: text-only causal pathway, stock
        causal_out = dispatch_attention_fn(
            q_und.unsqueeze(0), k_und.unsqueeze(0), v_und.unsqueeze(0), is_causal=True, enable_gqa=True,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        causal_out = causal_out.squeeze(0).flatten(-2, -1)

        all_k = torch.cat([k_und_for_gen, k_gen], dim=0)
        all_v = torch.cat([v_und, v_gen], dim=0)

        def stock(q):
            return dispatch_attention_fn(
                q.unsqueeze(0), all_k.unsqueeze(0), all_v.unsqueeze(0), is_causal=False, enable_gqa=True,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        full_out = self._gen_attention(q_gen, all_k, all_v, stock)
        if full_out is None:
            full_out = stock(q_gen)
        full_out = full_out.squeeze(0).flatten(-2, -1)

        und_out = attn.to_out(causal_out)
        gen_out = attn.to_add_out(full_out)
        return und_out, gen_out

    def _gen_attention(self, q_gen, all_k, all_v, stock):
        """The gen call with TACA on its vision queries, (1, N_gen, H, D); None: run it stock."""
        text_len = self.call_arg("taca_text_len")
        gamma = self.call_arg("taca_gamma")
        if not text_len:
            return None
        vis = self.call_arg("taca_visual_rows")  # None: every gen query is a vision query
        k, v = all_k.unsqueeze(0), all_v.unsqueeze(0)
        if vis is None:
            return self.taca_attention(q_gen.unsqueeze(0), k, v, text_len, gamma)
        if isinstance(vis, slice):
            q_vis = q_gen[vis]
        else:
            q_vis = q_gen.index_select(0, vis)
        if q_vis.shape[0] == 0:
            return None
        out_vis = self.taca_attention(q_vis.unsqueeze(0), k, v, text_len, gamma)
        if out_vis is None:
            return None
        other = self.call_arg("taca_other_rows")
        out = out_vis.new_empty((1,) + tuple(q_gen.shape))
        if isinstance(vis, slice):
            out[:, vis] = out_vis
            out[:, other] = stock(q_gen[other])
        else:
            out.index_copy_(1, vis, out_vis)
            out.index_copy_(1, other, stock(q_gen.index_select(0, other)))
        return out


@register
class Cosmos3Adapter(Adapter):
    name = "cosmos3"
    label = "Cosmos3OmniTransformer (Cosmos3)"
    transformer_classes = ("Cosmos3OmniTransformer",)
    stock_processors = frozenset({"Cosmos3AttnProcessor"})
    timestep = "t1000"  # timestep_value returns t * timestep_scale * 1000 (= t for the default 0.001)
    timestep_arg = "vision_timesteps"
    kwargs_name = None  # the forward passes no attention kwargs to the processors
    pipeline_t_is_1000_sigma = False  # the transformer's own t is exact; _current_timestep adds nothing
    pipelines = ()  # Cosmos3OmniPipeline is prompt-only but its tokenizer / VAE / guardrail: taca.enable(pipe) only
    max_sequence_length = 0

    def __init__(self, transformer):
        super().__init__(transformer)
        self._cached = None

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return {n: m for n, m in attention_modules(self.transformer).items() if n.endswith("self_attn")}

    def processor(self, name, module):
        return TacaCosmos3AttnProcessor(name)

    def batch(self, arg):
        ids = arg("input_ids")
        return None if ids is None else (1, ids.device)

    # one host sync per call: the layout checks and the noisy tokens' timesteps together. The hook
    # hands timestep_value and call_state the same `arg` accessor per transformer call: the result is
    # cached against that object (held, so its identity cannot be reused by a later call)
    def _inspect(self, arg):
        if self._cached is not None and self._cached[0] is arg:
            return self._cached[1]
        und_len = int(arg("und_len"))
        seq_len = int(arg("sequence_length"))
        text_idx = arg("text_indexes")
        has_sound = arg("sound_tokens") is not None and arg("sound_sequence_indexes") is not None
        has_action = arg("action_tokens") is not None and arg("action_sequence_indexes") is not None
        if text_idx.numel() != und_len:
            raise ValueError(
                f"taca: Cosmos3: {text_idx.numel()} text tokens but und_len={und_len}; TACA supports the layout the "
                f"Cosmos3 pipelines build, where the und (causal) prefix is exactly the text"
            )
        device = text_idx.device
        others = [("vision", arg("vision_sequence_indexes"))]
        if has_sound:
            others.append(("sound", arg("sound_sequence_indexes")))
        if has_action:
            others.append(("action", arg("action_sequence_indexes")))
        steps = [arg("vision_timesteps")]
        if has_sound:
            steps.append(arg("sound_timesteps"))
        if has_action and arg("action_mse_loss_indexes") is not None and arg("action_mse_loss_indexes").numel() > 0:
            steps.append(arg("action_timesteps"))
        steps = [s.reshape(-1) for s in steps if s is not None and s.numel() > 0]
        big = torch.iinfo(torch.int64).max
        stats = [text_idx.max() if und_len else torch.tensor(-1, device=device)]
        for _, idx in others:
            if idx.numel():
                stats += [idx.min(), idx.max()]
            else:
                stats += [torch.tensor(big, device=device), torch.tensor(-1, device=device)]
        vals = torch.stack([s.to(device=device, dtype=torch.float64) for s in stats])
        if steps:
            t = torch.cat([s.to(device=device, dtype=torch.float64) for s in steps])
            vals = torch.cat([vals, torch.stack([t.min(), t.max()])])
        vals = vals.tolist()  # the one host sync of the call
        if und_len and vals[0] >= und_len:
            raise ValueError(
                f"taca: Cosmos3: a text index ({int(vals[0])}) lies outside the und prefix [0, {und_len}); TACA "
                f"supports the layout the Cosmos3 pipelines build (text = the und prefix)"
            )
        for i, (name, idx) in enumerate(others):
            lo = vals[1 + 2 * i]
            if idx.numel() and lo < und_len:
                raise ValueError(
                    f"taca: Cosmos3: {name} tokens in the und (causal text) prefix (index {int(lo)} < und_len="
                    f"{und_len}) are not supported: the gen pathway's text keys must be exactly the text"
                )
        if not steps:
            raise ValueError("taca: Cosmos3: no noisy token in the call (every vision / sound / action token is "
                             "conditioning); TACA's rule reads the noisy target's timestep")
        t_min, t_max = vals[-2], vals[-1]
        if t_min != t_max:
            raise ValueError(
                f"taca: Cosmos3: the noisy tokens' timesteps differ ({t_min} .. {t_max}); TACA's rule takes one sigma "
                f"per sample (the noisy target's): supported are calls whose noisy tokens share one timestep, as "
                f"Cosmos3OmniPipeline and the modular Cosmos3 blocks pass"
            )
        n_gen = seq_len - und_len
        vis_idx = others[0][1]
        n_vis = vis_idx.numel()
        v_lo, v_hi = vals[1], vals[2]
        if n_vis == n_gen:
            rows = (None, None)  # all gen rows are vision (the indices are distinct positions >= und_len)
        elif n_vis and v_lo - und_len >= 0 and v_hi - v_lo + 1 == n_vis:
            a, b = int(v_lo) - und_len, int(v_hi) + 1 - und_len
            rows = (slice(a, b), None)
            if a == 0:
                rows = (slice(0, b), slice(b, n_gen))
            elif b == n_gen:
                rows = (slice(a, n_gen), slice(0, a))
            else:
                keep = torch.ones(n_gen, dtype=torch.bool, device=device)
                keep[a:b] = False
                rows = (torch.arange(a, b, device=device), keep.nonzero().flatten())
        else:
            keep = torch.ones(n_gen, dtype=torch.bool, device=device)
            keep[vis_idx - und_len] = False
            rows = ((vis_idx - und_len).to(torch.long), keep.nonzero().flatten())
        scale = float(getattr(self.transformer.config, "timestep_scale", 0.001))
        out = (und_len, t_min * (scale * 1000.0), rows)
        self._cached = (arg, out)
        return out

    def timestep_value(self, arg):
        return self._inspect(arg)[1]

    def call_state(self, arg):
        und_len, _, (vis, other) = self._inspect(arg)
        self._cached = None
        layers = getattr(self.transformer, "layers", None)
        gr = getattr(layers[0].self_attn.processor, "gamma_reverse", 1.0) if layers else 1.0
        if gr != 1.0:
            raise ValueError(
                f"taca: Cosmos3: gamma_reverse={gr}: no text query of Cosmos3 attends a vision key (the und "
                f"pathway is causal text-only), so only gamma_reverse=1 is supported"
            )
        return {"taca_text_len": und_len, "taca_visual_rows": vis, "taca_other_rows": other}
