"""Arguments of ``taca eval``."""
from __future__ import annotations


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="T2I-CompBench (not yet implemented)")
    e.set_defaults(func=lambda args: print("taca eval: not built yet") or 2)
