"""The miniature: a small MM-DiT trained here on synthetic compositional scenes.

- ``taca.mini.data``: the scene grammar (colors, shapes, counts, spatial relations), a batched
  torch renderer (signed distances, anti-aliased, CPU or GPU), the fixed evaluation prompt set
  and a writer for a folder of PNG + same-named .txt captions.
- ``taca.mini.judge``: a rule-based judge scoring an image against its caption per category,
  and Wilson confidence intervals.
- ``taca.mini.model``: ``MiniPipeline`` (a diffusers ``DiffusionPipeline``) around a small
  ``FluxTransformer2DModel`` in pixel space and a small T5 text encoder trained from scratch.
- ``taca.mini.pretrain``: from-scratch training of that model (``python -m taca.mini.pretrain``).

Only ``data`` and ``judge`` are torch-only; ``model`` and ``pretrain`` import diffusers and
transformers when they are used.
"""
