"""Tiny random-weight BLIP VQA and CLIP folders, built from configs with local tokenizers.

For tests and the GPU smoke run: they exercise the scorers' real loading and forward code
offline (the real scorers are 1.5 GB / 600 MB downloads). Scores from them mean nothing.

- BLIP: a BERT word-piece vocabulary of whole words with ``[DEC]`` (bos) and
  ``[ENC]`` added right after it, as the original BLIP tokenizer does; ``BlipConfig`` with 2-layer,
  32-wide text and vision towers at 32x32 pixels (patch 16).
- CLIP: a byte-pair vocabulary of single letters (no merges, so every lower-case word tokenizes
  letter by letter), ``CLIPConfig`` with 2-layer, 32-wide towers at 32x32 (patch 8).
"""
from __future__ import annotations

import os
from typing import Sequence

BLIP_WORDS: Sequence[str] = (
    "yes", "no", "a", "an", "the", "red", "blue", "green", "yellow", "black", "white", "car", "house", "bench",
    "bowl", "cat", "dog", "bird", "on", "left", "right", "of", "and", "round", "square", "wooden", "metallic",
    "?", ".", ",",
)


def save_tiny_blip(folder: str, seed: int = 0) -> str:
    """Write a tiny ``BlipForQuestionAnswering`` + ``BertTokenizer`` to ``folder``; returns it."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(BLIP_WORDS)
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    dec, enc = tok.convert_tokens_to_ids("[DEC]"), tok.convert_tokens_to_ids("[ENC]")
    assert (dec, enc) == (len(vocab), len(vocab) + 1), (dec, enc)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64, bos_token_id=dec,
                         sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                         encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=16),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_clip(folder: str, seed: int = 0) -> str:
    """Write a tiny ``CLIPModel`` + ``CLIPTokenizer`` to ``folder``; returns it."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,?'-")
    vocab_list = letters + [f"{c}</w>" for c in letters] + ["<unk>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = CLIPTokenizer(vocab=vocab, merges=[],
                        unk_token="<unk>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                        pad_token="<|endoftext|>", model_max_length=77)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
