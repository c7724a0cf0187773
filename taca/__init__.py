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
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        # cached: __getattr__ runs only for names missing from the module, so later lookups are plain (an
        # import_module per call cost ~7 us of host time per taca.joint_attention call)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'taca' has no attribute {name!r}")


__all__ = ["joint_attention", "enable", "disable", "enabled", "__version__"]
