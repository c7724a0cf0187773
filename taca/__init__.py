"""taca: Temperature-Adjusted Cross-modal Attention (arXiv 2506.07986) for diffusers MM-DiTs.

``taca.joint_attention`` is the op; ``taca.enable`` / ``taca.disable`` / ``taca.enabled``
patch the pipelines of the models in ``taca.models``. Heavy optional imports (diffusers, matplotlib) stay lazy.
"""
__version__ = "0.1.0"

_LAZY = {
    "joint_attention": ("ops", "joint_attention"),
    "enable": ("pipeline", "enable"),
    "disable": ("pipeline", "disable"),
    "enabled": ("pipeline", "enabled"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'taca' has no attribute {name!r}")


__all__ = ["joint_attention", "enable", "disable", "enabled", "__version__"]
