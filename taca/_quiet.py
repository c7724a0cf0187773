"""Silence notes from third-party imports that a taca user cannot act on."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

# transformers >= 5 logs, once per process, that the image processors of pipelines' optional
# IP-Adapter / Redux parts fall back to PIL without torchvision. Neither the demo nor
# ``taca generate`` uses those processors, so the note is noise here.
_NOISY_LOGGERS = ("transformers.utils.import_utils",)


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Raise the level of the loggers above to ERROR while diffusers pipelines are imported."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
