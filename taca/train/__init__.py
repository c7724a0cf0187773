"""``taca train``: LoRA training with TACA on (the paper's recipe), saved in diffusers' LoRA format.

    from taca.train import TrainConfig, train
    result = train(TrainConfig(model="black-forest-labs/FLUX.1-dev", data="./pairs", out="./taca-lora"))

``TrainConfig`` (``taca.train.config``) holds every argument of the command; ``train`` (in
``taca.train.loop``) runs it on accelerate (one process, or DDP / FSDP2 under ``accelerate launch``) and
returns a ``TrainResult``. See ``taca train --help``.
"""
from .config import ConfigError, TrainConfig

__all__ = ["TrainConfig", "ConfigError", "train"]


def train(cfg: TrainConfig, **kwargs):
    """Run ``cfg``; see :func:`taca.train.loop.train`."""
    from .loop import train as _train

    return _train(cfg, **kwargs)
