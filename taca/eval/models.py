"""The scorer models (BLIP VQA, CLIP) through transformers, loaded only from local folders.

BLIP VQA: the official scorer is the original BLIP code with ``model_base_vqa_capfilt_large.pth``;
transformers' ``Salesforce/blip-vqa-capfilt-large`` holds the same weights (converted by
``convert_blip_original_pytorch_to_hf.py``). ``BlipForQuestionAnswering.forward`` returns no
logits and neither it nor ``generate`` swaps the first question token to ``[ENC]`` (and
``generate`` attends the decoder to all question positions, padding included), so
:class:`BlipVQA` calls the submodules the way ``BLIP_VQA.vqa_prob`` does:

    image_embeds = vision_model(pixel_values).last_hidden_state              (B, 1 + P, D)
    q = tokenizer(questions, padding="longest", truncation=True, max_length=35); q.input_ids[:, 0] = [ENC]
    states = text_encoder(q.input_ids, q.attention_mask, encoder_hidden_states=image_embeds)  (B, L, D)
    logits = text_decoder([[bos]] * B, encoder_hidden_states=states, encoder_attention_mask=q.attention_mask)
    p = softmax(logits[:, 0, :]);  answer = p[yes] / (p[yes] + p[no])        (B,)

with bos = ``[DEC]`` (30522), ``[ENC]`` = 30523, yes = 2748, no = 2053 in the real vocabulary
(read from the tokenizer and config, so tiny test models work too). Images: Resize((480, 480),
bicubic) on the PIL image, /255, normalised with the CLIP mean/std, fp32. The transformers
checkpoint was converted at image size 384 (its 24x24 position embeddings are BLIP's 30x30 ones
interpolated at load time); at 480 they are interpolated back (bicubic), close to but not exactly
the original's, so such a score is marked with that deviation.

CLIP: ``CLIPModel`` from a local copy of ``openai/clip-vit-base-patch32`` (the OpenAI ViT-B/32
weights). Preprocessing as ``clip.load``'s: Resize(224, bicubic) of the short side, CenterCrop
224, /255, CLIP mean/std; text padded to 77 tokens; raw cosine of the projected, normalised
features (no x100, no 2.5, no clipping). fp16 on CUDA like ``clip.load``; fp32 on CPU.
"""
from __future__ import annotations

import json
import os
import textwrap
from typing import Dict, List, Optional, Sequence

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLIP_OFFICIAL_IMAGE_SIZE = 480
BLIP_MAX_QUESTION_TOKENS = 35


class ScorerMissing(Exception):
    """A scorer model folder that is missing or incomplete (exit code 2, one paragraph)."""


_FETCH = {
    "blip": ("--blip", "BLIP VQA (ViT-B, CapFilt-L; the weights of the official model_base_vqa_capfilt_large.pth)",
             "Salesforce/blip-vqa-capfilt-large", "blip-vqa-capfilt-large"),
    "clip": ("--clip", "CLIP ViT-B/32 (OpenAI weights, the official clip.load('ViT-B/32'))",
             "openai/clip-vit-base-patch32", "clip-vit-base-patch32"),
}


def missing_scorer_message(kind: str, folder: Optional[str], reason: str) -> str:
    arg, what, repo, local = _FETCH[kind]
    where = f"{folder!r} {reason}" if folder else "was not given"
    return textwrap.fill(
        f"taca eval score: argument {arg}: the scorer model {what} is needed, but {arg} {where}. Scorers are "
        f"loaded only from local folders. Fetch it once while online with `hf download {repo} --local-dir "
        f"./{local}` (pip install huggingface_hub for the `hf` command) and pass {arg} ./{local}.", width=100)


def check_folder(kind: str, folder: Optional[str]) -> str:
    """The folder, or ScorerMissing when it is not a transformers model folder."""
    if not folder:
        raise ScorerMissing(missing_scorer_message(kind, folder, ""))
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise ScorerMissing(missing_scorer_message(kind, folder, "does not exist"))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ScorerMissing(missing_scorer_message(kind, folder,
                                                   "has no config.json (not a transformers model folder)"))
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)):
        raise ScorerMissing(missing_scorer_message(kind, folder, "holds no weights (*.safetensors / *.bin)"))
    return folder


def weights_sha256(folder: str) -> Dict[str, str]:
    """sha256 of every weight file of a model folder (recorded in score.json)."""
    from .layout import sha256_file

    return {f: sha256_file(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
            if f.endswith((".safetensors", ".bin"))}


def _to_tensor(img, mean: Sequence[float], std: Sequence[float]):
    import torch

    a = np.asarray(img, dtype=np.float32) / 255.0                       # (H, W, 3)
    a = (a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # (3, H, W)


def _processor_stats(folder: str):
    p = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(p):
        with open(p) as f:
            cfg = json.load(f)
        return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


class BlipVQA:
    """P(yes) / (P(yes) + P(no)) of BLIP VQA for (image, question) pairs, as BLIP_VQA.vqa_prob."""

    def __init__(self, folder: str, device: str = "cpu", image_size: Optional[int] = None):
        import torch
        from transformers import AutoTokenizer, BlipForQuestionAnswering

        self.folder = check_folder("blip", folder)
        try:
            self.model = BlipForQuestionAnswering.from_pretrained(self.folder, local_files_only=True,
                                                                  dtype=torch.float32).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ScorerMissing(missing_scorer_message("blip", folder, f"cannot be loaded ({str(e).splitlines()[0]})"))
        self.device = device
        tc = self.model.config.text_config
        self.bos_id = int(tc.bos_token_id)
        enc = self.tokenizer.convert_tokens_to_ids("[ENC]")
        # The transformers tokenizer of blip-vqa-capfilt-large knows [DEC] but not [ENC]; the
        # original added [ENC] right after [DEC] (30522, 30523), which the embedding matrix has.
        self.enc_id = int(enc) if enc is not None and enc != self.tokenizer.unk_token_id else self.bos_id + 1
        if self.enc_id >= tc.vocab_size:
            raise ScorerMissing(missing_scorer_message("blip", folder, f"has no [ENC] token (vocab {tc.vocab_size})"))
        self.yes_id = int(self.tokenizer.convert_tokens_to_ids("yes"))
        self.no_id = int(self.tokenizer.convert_tokens_to_ids("no"))
        native = int(self.model.config.vision_config.image_size)
        real_vocab = tc.vocab_size == 30524
        self.image_size = int(image_size or (BLIP_OFFICIAL_IMAGE_SIZE if real_vocab else native))
        self.interpolate = self.image_size != native
        self.mean, self.std = _processor_stats(self.folder)
        self.deviations: List[str] = []
        if real_vocab and (self.yes_id, self.no_id, self.bos_id, self.enc_id) != (2748, 2053, 30522, 30523):
            self.deviations.append(f"token ids yes/no/[DEC]/[ENC] = {self.yes_id}/{self.no_id}/{self.bos_id}/"
                                   f"{self.enc_id}, not 2748/2053/30522/30523")
        if self.image_size != BLIP_OFFICIAL_IMAGE_SIZE:
            self.deviations.append(f"image size {self.image_size}, not the official 480")
        if self.interpolate and self.image_size == BLIP_OFFICIAL_IMAGE_SIZE:
            self.deviations.append(f"position embeddings of a {native}-px checkpoint interpolated to 480 px "
                                   f"(the original checkpoint is 480-px native)")

    def pixel_values(self, images) -> "torch.Tensor":
        """PIL images → (B, 3, S, S) float32: Resize((S, S), bicubic), /255, normalise."""
        import torch
        from PIL import Image

        return torch.stack([_to_tensor(im.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC),
                                       self.mean, self.std) for im in images])

    def image_embeds(self, pixel_values) -> "torch.Tensor":
        """(B, 3, S, S) → vision states (B, 1 + (S/16)^2, D)."""
        import torch

        with torch.no_grad():
            return self.model.vision_model(pixel_values=pixel_values.to(self.device),
                                           interpolate_pos_encoding=self.interpolate).last_hidden_state

    def yes_prob(self, image_embeds, questions: Sequence[str]) -> "torch.Tensor":
        """image_embeds: (B, 1 + P, D), questions: B strings (already pre_question'ed) → (B,) float32
        P(yes) / (P(yes) + P(no)) at the decoder's first step."""
        import torch

        q = self.tokenizer(list(questions), padding="longest", truncation=True, max_length=BLIP_MAX_QUESTION_TOKENS,
                           return_tensors="pt")
        ids = q.input_ids.clone().to(self.device)
        ids[:, 0] = self.enc_id
        mask = q.attention_mask.to(self.device)
        img_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        with torch.no_grad():
            states = self.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                             encoder_attention_mask=img_mask, return_dict=True).last_hidden_state
            start = torch.full((ids.shape[0], 1), self.bos_id, dtype=torch.long, device=self.device)
            logits = self.model.text_decoder(input_ids=start, encoder_hidden_states=states,
                                             encoder_attention_mask=mask, return_dict=True).logits[:, 0, :]
            p = torch.softmax(logits.float(), dim=1)
        return (p[:, self.yes_id] / (p[:, self.yes_id] + p[:, self.no_id])).cpu()


class ClipScorer:
    """Raw cosine similarity of CLIP image and text features (CLIPScore_eval/CLIP_similarity.py)."""

    def __init__(self, folder: str, device: str = "cpu", dtype: Optional[str] = None):
        import torch
        from transformers import AutoTokenizer, CLIPModel

        self.folder = check_folder("clip", folder)
        on_cuda = str(device).startswith("cuda")
        self.dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype or ("fp16" if on_cuda else "fp32")]
        try:
            self.model = CLIPModel.from_pretrained(self.folder, local_files_only=True, dtype=self.dtype)
            self.model = self.model.to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ScorerMissing(missing_scorer_message("clip", folder, f"cannot be loaded ({str(e).splitlines()[0]})"))
        self.device = device
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_len = int(self.model.config.text_config.max_position_embeddings)
        self.mean, self.std = _processor_stats(self.folder)
        self.deviations: List[str] = []
        if not (on_cuda and self.dtype == torch.float16):
            self.deviations.append(f"{str(self.dtype).replace('torch.', '')} on {device} (clip.load runs fp16 on CUDA)")

    def pixel_values(self, images) -> "torch.Tensor":
        """PIL images → (B, 3, S, S): Resize(S) of the short side (bicubic), CenterCrop(S), /255, normalise."""
        import torch
        from PIL import Image

        S = self.image_size
        out = []
        for im in images:
            w, h = im.size
            if w <= h:
                nw, nh = S, int(S * h / w)
            else:
                nw, nh = int(S * w / h), S
            im = im.resize((nw, nh), Image.BICUBIC)
            top, left = int(round((nh - S) / 2.0)), int(round((nw - S) / 2.0))
            im = im.crop((left, top, left + S, top + S)).convert("RGB")
            out.append(_to_tensor(im, self.mean, self.std))
        return torch.stack(out)

    def cosine(self, images, texts: Sequence[str]) -> "torch.Tensor":
        """B images and B texts → (B,) float32 cosine of the normalised projected features."""
        import torch

        px = self.pixel_values(images).to(self.device, self.dtype)
        t = self.tokenizer(list(texts), padding="max_length", max_length=self.max_len, truncation=True,
                           return_tensors="pt").to(self.device)
        with torch.no_grad():
            img = self.model.visual_projection(self.model.vision_model(pixel_values=px).pooler_output)
            txt = self.model.text_projection(self.model.text_model(input_ids=t.input_ids,
                                                                   attention_mask=t.attention_mask).pooler_output)
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            return (img * txt).sum(-1).float().cpu()
