"""``taca eval``: T2I-CompBench(++) generation, official scoring and the paper's table.

Modules (each importable without diffusers/transformers until a function needs them):

- ``layout``: the official run layout, the shipped ``*_val.txt`` prompt files (``prompts/``), hashes;
- ``generate``: resumable, accelerate-sharded image generation with ``taca.enable``;
- ``rules``: the official scoring arithmetic (2D/3D position, numeracy, B-VQA product, 3-in-1);
- ``parse``: prompt analysis, spaCy ``en_core_web_sm`` (official) or a documented rule parser;
- ``models``: BLIP VQA and CLIP through transformers, from local folders only;
- ``score`` / ``report``: the ``score`` and ``report`` commands; ``cli``: their arguments;
- ``tiny_scorers``: tiny random BLIP/CLIP folders for tests and smoke runs.

See docs/eval.md.
"""
