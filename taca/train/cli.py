"""Arguments of ``taca train``."""
from __future__ import annotations


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a TACA LoRA (not yet implemented)")
    t.set_defaults(func=lambda args: print("taca train: not built yet") or 2)
