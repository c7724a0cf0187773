"""Training checkpoints, all in safetensors + JSON (no pickles).

``<out>/checkpoints/checkpoint-<step>/``:

- ``lora.safetensors``: the adapter's trainable tensors (PEFT names, float32 as trained);
- ``optimizer.safetensors``: the optimizer's per-parameter state (``state.<i>.<name>``), with its
  ``param_groups`` in ``state.json``;
- ``rng-rank<r>.safetensors``: each process's torch CPU (and CUDA) generator states;
- ``state.json``: step, micro-batch position, lr scheduler state, the resolved config.

A checkpoint is written to ``checkpoint-<step>.tmp`` and renamed when complete, so a crash never
leaves a half checkpoint that ``--resume latest`` would pick; only the newest K are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional

import torch

PREFIX = "checkpoint-"


def checkpoints(out: str) -> List[str]:
    """Complete checkpoint folders under ``<out>/checkpoints``, oldest first."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(name[len(PREFIX):]), path))
    return [p for _, p in sorted(found)]


def resolve(out: str, resume: str) -> str:
    """The checkpoint folder that ``--resume`` names ("latest": the newest under ``out``)."""
    from .config import ConfigError

    if resume != "latest":
        if not os.path.isfile(os.path.join(resume, "state.json")):
            raise ConfigError(f"taca train: argument --resume: {resume} is not a complete checkpoint (no state.json)")
        return resume
    found = checkpoints(out)
    if not found:
        raise ConfigError(f"taca train: argument --resume: no checkpoint under {os.path.join(out, 'checkpoints')}")
    return found[-1]


def _flatten_optimizer(sd: Dict[str, Any]):
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{i}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{i}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    for key, v in meta["scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> Dict[str, torch.Tensor]:
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def save(out: str, step: int, *, lora: Dict[str, torch.Tensor], optimizer: Dict[str, Any], scheduler,
         position: int, config: Dict[str, Any], rank: int, world: int, is_main: bool, barrier,
         keep: int) -> Optional[str]:
    """Write checkpoint ``step`` (every process calls this; ``barrier`` syncs them).

    lora: the adapter's full tensors by name; optimizer: the optimizer's state dict (full tensors)."""
    from safetensors.torch import save_file

    root = os.path.join(out, "checkpoints")
    final = os.path.join(root, f"{PREFIX}{step:06d}")
    tmp = final + ".tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    save_file(_rng_state(), os.path.join(tmp, f"rng-rank{rank}.safetensors"))
    if is_main:
        save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, os.path.join(tmp, "lora.safetensors"))
        tensors, meta = _flatten_optimizer(optimizer)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        state = {"step": step, "position": position, "world": world, "optimizer": meta,
                 "scheduler": scheduler.state_dict(), "config": config}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1, default=str)
    barrier()
    if is_main:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: str, rank: int) -> Dict[str, Any]:
    """The pieces of a checkpoint: ``lora``, ``optimizer`` (a state dict), ``state`` (state.json),
    ``rng`` (this rank's generator states, or None when the checkpoint had fewer processes)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    rng_file = os.path.join(path, f"rng-rank{rank}.safetensors")
    return {
        "lora": load_file(os.path.join(path, "lora.safetensors")),
        "optimizer": _unflatten_optimizer(load_file(os.path.join(path, "optimizer.safetensors")), state["optimizer"]),
        "state": state,
        "rng": load_file(rng_file) if os.path.isfile(rng_file) else None,
    }


def restore_rng(rng: Optional[Dict[str, torch.Tensor]]) -> None:
    if rng is None:
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
