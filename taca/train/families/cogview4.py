"""CogView4 (``CogView4Transformer2DModel``, ``CogView4Pipeline``) for ``taca train``.

Conventions, from ``CogView4Pipeline`` (diffusers 0.42.1, the inference path TACA's schedule is read
on) and diffusers' ``examples/cogview4-control/train_control_cogview4.py`` (the only diffusers
training script for this transformer; its plain text-to-image parts):

- latents: ``vae(x).mode() * scaling_factor``, (B, C, h, w): the pipeline decodes ``latents /
  scaling_factor`` (no shift added back; the script subtracts ``shift_factor`` when encoding, and
  CogView4-6B's VAE has ``shift_factor`` 0 and ``scaling_factor`` 1, so both agree on the real
  model; where they would not, the pipeline's decode is followed).
- text: ``encode_prompt`` = the GLM's second-to-last hidden state over the caption's ids LEFT-padded
  with the pad token, first by the tokenizer to the batch's longest prompt, then to a multiple of 16;
  the GLM gets no attention mask (it attends the pads, and the real tokens' positions move with their
  number) and neither does the transformer. So a caption's embedding, and its image, depend on the
  batch it is encoded in: the pipeline's own batch of a short and a longer prompt gives the short
  one other embeddings than alone. Training follows the pipeline on one prompt: each caption is
  encoded as if alone (its own length, rounded up to 16), captions of one rounded length batched
  together only under left padding, where their ids are exactly those of each alone.
- forward: a batch whose captions have different lengths cannot be padded into one transformer call
  (the pipeline passes no mask, and a text mask given to the model is a float 0/1 matrix ADDED to
  the logits, which masks nothing), so ``predict`` runs one transformer call per caption length
  (one call when they all have the same length, the usual case for short captions): the output of
  a caption never depends on the others in its batch.
- timestep: the transformer gets the scheduler's UNSHIFTED timestep ``t`` (the pipeline hands
  explicit integer timesteps and their sigmas to ``set_timesteps``, which shifts only the sigmas,
  resolution-dependently: ``sigma = mu / (mu + 1/s - 1)``, s = t / 1000, with the LINEAR time
  shift and ``mu = sqrt(image_seq_len / 256) * 0.75 + 0.25`` from the pipeline's
  ``calculate_shift``; the script noises with the same ``mu / (mu + 1/s - 1)`` and passes the
  unshifted ``timesteps``). ``predict`` gets the noise level sigma and passes ``t = 1000 s`` with s
  the inverse shift ``sigma / (sigma + mu (1 - sigma))`` (``exp(mu)`` under the exponential time
  shift; the static shift without dynamic shifting). ``original_size = target_size = (H, W)`` in
  pixels, ``crop_coords = (0, 0)``, as the pipeline's defaults and the script. The model predicts
  ``noise - x0`` (the pipeline hands it to the Euler step as is; the script's target).
- sigmas: not shifted when sampled (``static_shift``: 1 under the scheduler's dynamic shifting).
- TACA: the adapter's timestep convention is "scheduler" (sigma is looked up in the pipeline's
  scheduler, where ``timesteps[i] == t``), and training enables TACA on the bare transformer:
  ``predict`` hands the handle, for its own calls, a table of this batch's (t, sigma), so that each
  sample gets the gamma of its noise level, as the pipeline's scheduler would give it.
- LoRA targets: diffusers' usual ``to_q, to_k, to_v, to_out.0`` (no LoRA script exists for
  CogView4; diffusers' CogView4 LoRA tests target these) of every block's joint attention
  ``transformer_blocks.<i>.attn1``; ``attn+ff`` adds the blocks' feed-forward ``ff.net.0.proj /
  ff.net.2`` (one FFN, shared by the image and text streams).

Text to image only: ``CogView4ControlPipeline`` conditions on a control image (its latents
concatenated to the noisy ones on the channels), which taca train does not feed: it is refused.
"""
from __future__ import annotations

import math

import torch

from . import _DiffusersFamily, _unwrap, _vae_latents, call_default, layer_names

_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2")
_MASK = "prompt_mask"
_PAD_TO = 16  # the pipeline pads the ids to a multiple of 16 (on the left)


class CogView4Family(_DiffusersFamily):
    name = "cogview4"
    _text_attrs = ("text_encoder",)

    def __init__(self, pipe):
        cls = type(pipe).__name__
        if "Control" in cls:
            raise ValueError(
                f"taca train: {cls} conditions on a control image, which taca train does not feed; CogView4 "
                f"training is text-to-image (load the model as a CogView4Pipeline)")
        super().__init__(pipe)
        t = pipe.transformer
        c = t.config
        if c.in_channels != c.out_channels:
            raise ValueError(
                f"taca train: this CogView4 transformer takes {c.in_channels} input channels for "
                f"{c.out_channels} output channels (a control model: the noisy latents plus a control image's), "
                f"which taca train does not feed; CogView4 training is text-to-image")
        self.attn_targets = layer_names(t, "transformer_blocks", _ATTN)
        self.ff_targets = layer_names(t, "transformer_blocks", _FF)
        self._patch = int(c.patch_size)
        self._vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
        sch = dict(pipe.scheduler.config)
        for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                  "invert_sigmas"):
            if sch.get(k):
                raise ValueError(f"taca train: CogView4's scheduler has {k}={sch[k]!r}: the transformer's timestep "
                                 f"cannot be recovered from sigma in closed form; not supported")
        self._sched = sch
        self._n_train = int(sch.get("num_train_timesteps", 1000))

    # --- text --------------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        pipe = self.pipe
        msl = int(max_sequence_length) if max_sequence_length is not None else \
            int(call_default(pipe, "max_sequence_length", 1024))
        captions = list(captions)
        tok = pipe.tokenizer
        # each caption's padded length alone: its ids (truncated as the pipeline truncates) rounded up to 16
        n = [len(tok(c, max_length=msl, truncation=True, add_special_tokens=True).input_ids) for c in captions]
        padded = [-(-k // _PAD_TO) * _PAD_TO for k in n]
        if getattr(tok, "padding_side", "right") == "left":
            # the ids of captions of one padded length, batched, are each one's alone: batch them
            groups = {}
            for j, L in enumerate(padded):
                groups.setdefault(L, []).append(j)
            groups = list(groups.values())
        else:
            groups = [[j] for j in range(len(captions))]
        embeds = [None] * len(captions)
        with torch.no_grad():
            for idx in groups:
                pe, _ = pipe.encode_prompt([captions[j] for j in idx], do_classifier_free_guidance=False,
                                           device=device, max_sequence_length=msl)
                for r, j in enumerate(idx):
                    if pe.shape[1] != padded[j]:
                        raise RuntimeError(f"taca train: CogView4 caption {j} encoded to {pe.shape[1]} tokens, "
                                           f"not its own {padded[j]}")
                    embeds[j] = pe[r]
        return _left_pad(embeds)

    def split_text(self, enc):
        mask = enc[_MASK].bool()
        out = []
        for pe, m in zip(enc["prompt_embeds"], mask):
            n = int(m.sum())
            if not bool(m[m.shape[0] - n:].all()):
                raise ValueError("taca train: the CogView4 text mask must mark the last tokens (left padding)")
            out.append({"prompt_embeds": pe[pe.shape[0] - n:]})
        return out

    def collate(self, entries):
        return _left_pad([e["prompt_embeds"] for e in entries])

    # --- images ------------------------------------------------------------------------------
    def encode_images(self, pixels):
        with torch.no_grad():
            lat = _vae_latents(self.vae(), pixels, shift=False)  # the pipeline decodes latents / scaling_factor
        p = self._patch
        if lat.shape[-2] % p or lat.shape[-1] % p:
            raise ValueError(f"taca train: CogView4 latents must have height and width divisible by the patch size "
                             f"{p}, got {lat.shape[-2]}x{lat.shape[-1]}")
        return lat

    # --- forward -----------------------------------------------------------------------------
    def _shift_factor(self, h: int, w: int) -> float:
        """The m of the scheduler's shift sigma = m s / (1 + (m - 1) s) for latents of h x w."""
        from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

        c = self._sched
        if not c.get("use_dynamic_shifting", False):
            return float(c.get("shift", 1.0) or 1.0)
        mu = calculate_shift((h * w) // self._patch ** 2, c.get("base_image_seq_len", 256),
                             c.get("base_shift", 0.25), c.get("max_shift", 0.75))
        return math.exp(mu) if c.get("time_shift_type", "exponential") == "exponential" else float(mu)

    def timestep(self, sigma: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The transformer's timestep for noise level sigma on latents of h x w: 1000 times the
        scheduler's unshifted s, inverting its shift (float64, then float32 as the pipeline's t)."""
        m = self._shift_factor(h, w)
        s = sigma.double()
        s = s / (s + m * (1.0 - s))
        return (s * self._n_train).float()

    def predict(self, transformer, noisy, sigma, cond, guidance):
        from ...pipeline import get_handle

        B, _, h, w = noisy.shape
        pe, mask = cond["prompt_embeds"], cond[_MASK].bool()
        t = self.timestep(sigma, h, w).to(noisy.device)
        size = torch.tensor([[h * self._vae_factor, w * self._vae_factor]], dtype=pe.dtype, device=pe.device)
        size = size.expand(B, 2)
        crop = torch.zeros(B, 2, dtype=pe.dtype, device=pe.device)
        lengths = mask.sum(1).tolist()

        def call(idx, L):
            return transformer(hidden_states=noisy[idx], encoder_hidden_states=pe[idx, pe.shape[1] - L:],
                               timestep=t[idx], original_size=size[idx], target_size=size[idx],
                               crop_coords=crop[idx], return_dict=False)[0]

        # TACA's "scheduler" convention reads sigma where the scheduler's timesteps[i] == t: give the
        # handle this batch's table for these calls
        handle = get_handle(_unwrap(transformer))
        prev = handle.sigma_table if handle is not None else None
        if handle is not None:
            handle.sigma_table = (t.detach().clone(), sigma.detach().to(device=t.device, dtype=torch.float32).clone())
        try:
            if len(set(lengths)) == 1:
                return call(slice(None), int(lengths[0]))
            order, pieces, gammas = [], [], []
            for L in sorted(set(lengths)):
                idx = [j for j, n in enumerate(lengths) if n == L]
                order += idx
                pieces.append(call(torch.tensor(idx, device=noisy.device), int(L)))
                if handle is not None:
                    g = handle.last_gamma
                    gammas.append(torch.ones(len(idx)) if g is None else g.detach().float().cpu())
            inv = torch.empty(B, dtype=torch.long)
            inv[torch.tensor(order)] = torch.arange(B)
            if handle is not None:
                # the batch's gammas, per sample, as one call would have left them (what training records)
                g = torch.cat(gammas)[inv]
                handle.last_gamma = g.to(noisy.device) if bool((g != 1.0).any()) else None
            return torch.cat(pieces)[inv.to(noisy.device)]
        finally:
            if handle is not None:
                handle.sigma_table = prev

    def lora_saver(self):
        from diffusers import CogView4Pipeline

        return CogView4Pipeline


def _left_pad(embeds):
    """(L_i, D) tensors -> {"prompt_embeds": (B, max L, D) zero-padded on the LEFT, "prompt_mask":
    (B, max L) bool, True on each row's own last L_i tokens}."""
    n = [int(e.shape[0]) for e in embeds]
    L = max(n)
    pe = embeds[0].new_zeros((len(embeds), L) + tuple(embeds[0].shape[1:]))
    for j, e in enumerate(embeds):
        pe[j, L - n[j]:] = e
    mask = torch.arange(L, device=pe.device)[None, :] >= (L - torch.tensor(n, device=pe.device))[:, None]
    return {"prompt_embeds": pe, _MASK: mask}
