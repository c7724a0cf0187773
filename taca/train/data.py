"""Training data: discovery and checks, image preprocessing, the on-disk cache and the sampler.

Data: a folder of images with same-named ``.txt`` captions (``cat.png`` + ``cat.txt``), or a
``.jsonl`` file of ``{"image": path, "caption": text}`` lines (paths relative to the file). For the
pipelines that condition on reference images (FLUX.1 Kontext, FLUX.2) a JSONL line may add
``"reference": path`` or ``"references": [path, ...]``: the image is then the edit's result, the
references its inputs, and every line gives the same number of them.
Images, references too, are resized (shorter side to the resolution, Lanczos) and center-cropped
to a square.

Cache: each image's latents and each caption's text embeddings are computed once and stored as
safetensors under ``<cache>/latents/<key>.safetensors`` and ``<cache>/text/<key>.safetensors``.
The key hashes the content (the image file's bytes, the caption's text) together with what
produced the tensors (the model, its encoder configs and weight files' sizes and mtimes, the
resolution, the text length, the dtype), so a changed image, caption or model never reuses a
stale entry and several models can share one cache folder.

Sampler: epoch e visits the samples in ``randperm(N)`` seeded by (seed, e); global batch g of
an epoch is ``perm[g*G:(g+1)*G]`` with G = batch size x processes (the last partial batch is
dropped), and process r takes its r-th slice. The position in the data is the global micro-batch
counter alone, so resuming and changing the number of processes (same global batch) visit the
same samples in the same order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .._util import sha256_file as file_sha256  # noqa: F401  (the cache key of an image)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _derr(msg: str) -> ValueError:
    from .config import ConfigError

    return ConfigError(f"taca train: argument --data: {msg}")


@dataclass(frozen=True)
class Sample:
    image: str
    caption: str
    references: Tuple[str, ...] = ()  # reference (input) images of an edit, in order


def discover(data: str) -> List[Sample]:
    """The (image, caption) pairs of a folder or a JSONL file, sorted by image path; every image
    is checked to be readable. Raises ConfigError naming ``--data`` on any problem."""
    if os.path.isdir(data):
        samples = _from_folder(data)
    elif data.endswith(".jsonl") and os.path.isfile(data):
        samples = _from_jsonl(data)
    else:
        raise _derr(f"{data} is neither a folder nor a .jsonl file")
    if not samples:
        raise _derr(f"{data} holds no images ({', '.join(IMAGE_EXTS)})")
    counts = sorted({len(s.references) for s in samples})
    if len(counts) > 1:
        first = {n: next(s.image for s in samples if len(s.references) == n) for n in counts}
        raise _derr(f"every sample needs the same number of reference images, {data} has "
                    f"{' and '.join(f'{n} ({os.path.basename(first[n])}, ...)' for n in counts)}")
    for s in samples:
        for path in (s.image,) + s.references:
            check_image(path)
    return samples


def n_references(samples: List[Sample]) -> int:
    """The number of reference images each sample has (``discover`` checked it is the same for all)."""
    return len(samples[0].references) if samples else 0


def _from_folder(folder: str) -> List[Sample]:
    out = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        cap = os.path.join(folder, stem + ".txt")
        if not os.path.isfile(cap):
            raise _derr(f"{os.path.join(folder, name)} has no caption file {stem}.txt beside it")
        with open(cap, encoding="utf-8") as f:
            caption = f.read().strip()
        if not caption:
            raise _derr(f"the caption {cap} is empty")
        out.append(Sample(os.path.join(folder, name), caption))
    return out


def _from_jsonl(path: str) -> List[Sample]:
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise _derr(f"{path} line {i} is not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(rec.get("caption"), str):
                raise _derr(f'{path} line {i}: expected {{"image": "<path>", "caption": "<text>"}}')
            if not rec["caption"].strip():
                raise _derr(f"{path} line {i}: the caption is empty")
            img = _existing(base, rec["image"], f"{path} line {i}: image")
            refs = _references(rec, f"{path} line {i}")
            out.append(Sample(img, rec["caption"].strip(), tuple(_existing(base, r, f"{path} line {i}: reference")
                                                                 for r in refs)))
    return sorted(out, key=lambda s: s.image)


def _existing(base: str, p: str, what: str) -> str:
    full = p if os.path.isabs(p) else os.path.join(base, p)
    if not os.path.isfile(full):
        raise _derr(f"{what} {full} does not exist")
    return full


def _references(rec: dict, where: str) -> List[str]:
    """A JSONL record's reference paths: ``"reference": path`` or ``"references": [path, ...]``."""
    if "reference" in rec and "references" in rec:
        raise _derr(f'{where}: give "reference" or "references", not both')
    if "reference" in rec:
        refs = [rec["reference"]]
    elif "references" not in rec:
        return []
    else:
        refs = rec["references"]
        if not isinstance(refs, list) or not refs:
            raise _derr(f'{where}: "references" must be a non-empty list of image paths')
    if not all(isinstance(r, str) and r for r in refs):
        raise _derr(f'{where}: a reference must be an image path (a string), got {refs!r}')
    return refs


def check_image(path: str) -> None:
    """Raise ConfigError unless ``path`` decodes as an image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many types for truncated / corrupt files
        raise _derr(f"{path} is not a readable image ({type(e).__name__}: {e})") from None


def load_pil(path: str, resolution: int, center_crop: bool = True):
    """The RGB PIL image R x R: shorter side resized to R (Lanczos), then a center (or top-left) crop."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        im = im.resize((nw, nh), Image.LANCZOS)
        x0, y0 = ((nw - resolution) // 2, (nh - resolution) // 2) if center_crop else (0, 0)
        return im.crop((x0, y0, x0 + resolution, y0 + resolution))


def load_image(path: str, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """(3, R, R) float32 in [-1, 1]: ``load_pil``'s image."""
    import numpy as np

    arr = np.asarray(load_pil(path, resolution, center_crop), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def component_fingerprint(model: str, modules: Iterable[torch.nn.Module]) -> str:
    """Identity of what encodes: the model id or path, the modules' configs, and for local folders
    the weight files' names, sizes and mtimes (hashing multi-GB weights would take minutes)."""
    h = hashlib.sha256(os.path.abspath(model).encode() if os.path.exists(model) else model.encode())
    for m in modules:
        cfg = getattr(m, "config", None)
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
        h.update(str(next(m.parameters()).dtype).encode())
    if os.path.isdir(model):
        for root, _, files in sorted(os.walk(model)):
            for f in sorted(files):
                if f.endswith((".safetensors", ".bin", ".pt")):
                    st = os.stat(os.path.join(root, f))
                    h.update(f"{os.path.relpath(os.path.join(root, f), model)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


SPARE_BYTES = 1 << 30  # free space a full cache leaves on its disk (checkpoints and adapters come after it)


class Cache:
    """Latents and text embeddings on disk, one safetensors file per image / caption."""

    def __init__(self, root: str, image_key: str, text_key: str):
        self.root = root
        self.image_key = image_key
        self.text_key = text_key
        self.entries: List[Tuple[str, str]] = []  # per sample: (latent file, text file)
        self.references: List[Tuple[str, ...]] = []  # per sample: its references' latent files

    def latent_path(self, image_sha: str, key: Optional[str] = None) -> str:
        """The latents of an image; ``key``: what produced them, when not ``image_key`` (references at
        another size)."""
        return os.path.join(self.root, "latents", f"{image_sha[:32]}-{key or self.image_key}.safetensors")

    def text_path(self, caption_sha: str) -> str:
        return os.path.join(self.root, "text", f"{caption_sha[:32]}-{self.text_key}.safetensors")

    @staticmethod
    def write(path: str, tensors: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)  # readers never see half a file

    def check_space(self, entry_bytes: int, n_more: int, what: str, hint: str = "") -> None:
        """Raise ConfigError naming ``--cache-dir`` when ``n_more`` more entries of about ``entry_bytes``
        each would not fit in the free space of the cache folder's disk with ``SPARE_BYTES`` left: the
        first encoded batch tells an entry's size, so a cache that cannot fit stops there, not hours
        later on a full disk."""
        import shutil

        need, free = entry_bytes * n_more, shutil.disk_usage(self.root).free
        if need + SPARE_BYTES > free:
            from .config import ConfigError

            raise ConfigError(
                f"taca train: argument --cache-dir: the {what} need about {need / 2**30:.1f} GiB more ({n_more} "
                f"entries of {entry_bytes / 2**20:.1f} MiB), {free / 2**30:.1f} GiB is free on {self.root}; free space "
                f"or point --cache-dir at a larger disk{hint}; the entries written so far are kept, and the same command reuses "
                f"them")

    @staticmethod
    def read(path: str) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(path)


class Sampler:
    """Which samples each process trains on at global micro-batch ``c`` (see the module doc)."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int):
        self.n, self.bs, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.global_batch = batch_size * world
        if n < self.global_batch:
            from .config import ConfigError

            raise ConfigError(f"taca train: argument --batch-size: the data has {n} samples, fewer than one global "
                              f"batch ({batch_size} x {world} processes)")
        self.per_epoch = n // self.global_batch
        self._perm: Tuple[int, Optional[torch.Tensor]] = (-1, None)

    def epoch_of(self, c: int) -> int:
        return c // self.per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, 0x5EED, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_indices(self, c: int) -> List[int]:
        """Sample indices of global micro-batch ``c`` (all processes)."""
        perm = self._permutation(self.epoch_of(c))
        g = c % self.per_epoch
        return perm[g * self.global_batch:(g + 1) * self.global_batch].tolist()

    def local(self, c: int) -> Tuple[List[int], List[int]]:
        """(sample indices, positions in the global batch) of this process at micro-batch ``c``."""
        idx = self.global_indices(c)
        pos = list(range(self.rank * self.bs, (self.rank + 1) * self.bs))
        return [idx[p] for p in pos], pos


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF

