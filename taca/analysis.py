"""Attention analyses of the TACA paper (Figures 2 and 3), from kernel telemetry only.

Everything here works from what the patched processors emit through :mod:`taca.telemetry`
(q, k after norm and RoPE, lse and the kernel's text_mass): no N x N matrix is built at any size.

- Text mass (paper Fig. 2, "relative magnitude of visual-text attention"): for a visual query i,
  ``text_mass_i = sum_{j text} P_ij``. Against typical cross-attention, where a visual query's
  softmax runs over text keys only and the text mass is 1 by construction, the relative magnitude
  ``P_full(i, j) / P_cross(i, j)`` is the same for every text key j and equals ``text_mass_i``
  (this is the reconstruction in the team's paper notes, section 5; the paper gives no formula).
  It is recorded per denoising step and per attention layer, with the gamma actually in effect,
  and for any other gamma on the same q, k ("counterfactual"), exactly, from lse and the text
  keys: with s = scale * q . k_text and g0 the gamma in effect,
  ``V_i = exp(lse_i) * (1 - text_mass_i)`` (the visual-key part of the softmax denominator) and
  ``text_mass_i(g) = T_i(g) / (T_i(g) + V_i)`` with ``T_i(g) = sum_{j text} exp(g s_ij)``.
  Memory O(N * text_len) per head chunk.
- Attention maps (paper Fig. 3): for chosen text-token indices J,
  ``map_i = sum_{j in J} exp(g * s_ij - lse_i)``, averaged over heads and layers, reshaped to the
  image-token grid; O(N * len(J)) memory. :func:`map_difference` gives TACA minus baseline.

Typical use (any FLUX or SD3 pipeline with TACA enabled, gamma 1 included)::

    import taca, taca.analysis as ta
    taca.enable(pipe, gamma=1.2, schedule="paper")
    with ta.record(pipe, gammas=(1.0, 1.1, 1.2, 1.3), token_indices=[3, 4], grid=(64, 64)) as rec:
        image = pipe(prompt, generator=torch.Generator().manual_seed(42)).images[0]
    tel = rec.result()            # TextMassTelemetry
    tel.per_step()                # (S,) mean text mass of image queries per step
    fig = ta.plot_text_mass({"TACA": tel}, layers=[0, 10])
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .telemetry import AttentionEvent, recording

_CHUNK_ELEMS = 1 << 24  # float32 elements per (B, heads, N_vis, text_len) chunk: 64 MiB


def _visual(x: torch.Tensor, text_len: int, text_first: bool) -> torch.Tensor:
    """Rows of the visual tokens along dim 2 of a (B, H, N, ...) tensor (a view, no copy)."""
    n = x.shape[2]
    return x[:, :, text_len:] if text_first else x[:, :, : n - text_len]


def _text(x: torch.Tensor, text_len: int, text_first: bool) -> torch.Tensor:
    n = x.shape[2]
    return x[:, :, :text_len] if text_first else x[:, :, n - text_len:]


def counterfactual_text_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    text_mass: torch.Tensor,
    *,
    text_len: int,
    text_first: bool,
    scale: float,
    gammas: Sequence[float],
) -> torch.Tensor:
    """Text mass of every visual query for other gammas on the same q, k.

    q, k: (B, H, N, D); lse, text_mass: (B, H, N) as computed with whatever gamma was in
    effect (it cancels: only the visual-key part of the denominator is taken from them).
    Returns (len(gammas), B, H, N_vis) float32, N_vis = N - text_len, where
    ``text_mass(g) = sigmoid(logsumexp_j(g * s_ij) - log V_i)`` and
    ``log V_i = lse_i + log(1 - text_mass_i)``. Memory O(N * text_len), chunked over heads.
    """
    B, H, N, D = q.shape
    if text_len <= 0 or text_len >= N:
        raise ValueError(f"taca: text_len={text_len} leaves no text or no visual tokens (N={N})")
    nv = N - text_len
    gl = torch.tensor([float(g) for g in gammas], dtype=torch.float32, device=q.device)
    out = torch.empty(len(gammas), B, H, nv, dtype=torch.float32, device=q.device)
    qv, kt = _visual(q, text_len, text_first), _text(k, text_len, text_first)
    lv = _visual(lse, text_len, text_first).float()
    tv = _visual(text_mass, text_len, text_first).float()
    # (B, H, N_vis): log of the visual-key part of the denominator at gamma0.
    log_v = lv + torch.log1p(-tv.clamp(max=1.0))
    hc = max(1, min(H, _CHUNK_ELEMS // max(1, B * nv * text_len)))
    for h0 in range(0, H, hc):
        h1 = min(H, h0 + hc)
        s = torch.matmul(qv[:, h0:h1].float(), kt[:, h0:h1].float().transpose(-1, -2)) * scale
        for gi in range(len(gammas)):
            log_t = torch.logsumexp(s * gl[gi], dim=-1)
            out[gi, :, h0:h1] = torch.sigmoid(log_t - log_v[:, h0:h1])
    return out


def text_token_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    text_len: int,
    text_first: bool,
    gamma: Union[float, torch.Tensor],
    scale: float,
    token_indices: Sequence[int],
) -> torch.Tensor:
    """Softmax probabilities of visual queries on chosen text tokens, from lse only.

    q, k: (B, H, N, D); lse: (B, H, N) computed with ``gamma`` (float or (B,)).
    token_indices: positions inside the text block, 0 <= j < text_len.
    Returns (B, H, N_vis, len(token_indices)) float32: ``exp(gamma * scale * q_i . k_j - lse_i)``.
    """
    B, H, N, D = q.shape
    idx = [int(j) for j in token_indices]
    for j in idx:
        if not 0 <= j < text_len:
            raise ValueError(f"taca: token index {j} is outside the text block [0, {text_len})")
    tb = 0 if text_first else N - text_len
    kj = k[:, :, [tb + j for j in idx]].float()
    g = torch.as_tensor(gamma, dtype=torch.float32, device=q.device).reshape(-1)
    g = (g.expand(B) if g.numel() == 1 else g).view(B, 1, 1, 1)
    s = torch.matmul(_visual(q, text_len, text_first).float(), kj.transpose(-1, -2)) * scale * g
    return torch.exp(s - _visual(lse, text_len, text_first).float().unsqueeze(-1))


@dataclass
class TextMassTelemetry:
    """What :class:`Recorder` collected over one pipeline call.

    sigmas: per step, the transformer's timestep as sigma in [0, 1] (None if unseen).
    layers: attention-module names in execution order (the layer axis below).
    mass: (S, L, B) mean text mass of the visual queries (over heads and visual queries),
      with the gamma in effect. gamma: (S, L, B) that gamma.
    counterfactual: {g: (S, L, B)} the same quantity on the same q, k with gamma g.
    maps: (S, B, N_vis) or (S, B, h, w) with ``grid``: mass on the chosen text tokens per image
      token, averaged over heads and layers; None unless token_indices were given.
    Missing (step, layer) entries (a layer that did not run) are NaN.
    """

    sigmas: List[Optional[float]]
    layers: List[str]
    mass: torch.Tensor
    gamma: torch.Tensor
    counterfactual: Dict[float, torch.Tensor] = field(default_factory=dict)
    maps: Optional[torch.Tensor] = None
    text_len: int = 0
    n_visual: int = 0
    token_indices: Optional[List[int]] = None

    @property
    def num_steps(self) -> int:
        return self.mass.shape[0]

    def per_step(self, gamma: Optional[float] = None, layers: Optional[Sequence[int]] = None,
                 sample: Optional[int] = None) -> torch.Tensor:
        """(S,) text mass averaged over layers (or the chosen layer indices) and samples.

        gamma: None for the gamma in effect, else a counterfactual gamma that was recorded.
        """
        x = self._select(gamma)
        if layers is not None:
            x = x[:, list(layers)]
        x = x[..., sample] if sample is not None else x.nanmean(-1)
        return x.nanmean(-1)

    def per_layer(self, gamma: Optional[float] = None, steps: Optional[Sequence[int]] = None,
                  sample: Optional[int] = None) -> torch.Tensor:
        """(L,) text mass averaged over steps (or the chosen steps) and samples."""
        x = self._select(gamma)
        if steps is not None:
            x = x[list(steps)]
        x = x[..., sample] if sample is not None else x.nanmean(-1)
        return x.nanmean(0)

    def relative_magnitude(self, gamma: Optional[float] = None) -> torch.Tensor:
        """(S, L) text mass divided by what typical cross-attention gives (exactly 1)."""
        return self._select(gamma).nanmean(-1) / cross_attention_reference()

    def gamma_per_step(self) -> torch.Tensor:
        """(S,) the gamma that was in effect per step (mean over layers and samples)."""
        return self.gamma.nanmean(-1).nanmean(-1)

    def _select(self, gamma: Optional[float]) -> torch.Tensor:
        if gamma is None:
            return self.mass
        for g, v in self.counterfactual.items():
            if abs(g - float(gamma)) < 1e-9:
                return v
        raise KeyError(f"taca: gamma={gamma} was not recorded; recorded: {sorted(self.counterfactual)}")

    def to_dict(self) -> Dict[str, object]:
        """Plain lists, for JSON."""
        return {
            "sigmas": self.sigmas, "layers": self.layers, "text_len": self.text_len,
            "n_visual": self.n_visual, "mass": self.mass.tolist(), "gamma": self.gamma.tolist(),
            "counterfactual": {str(g): v.tolist() for g, v in self.counterfactual.items()},
        }


def cross_attention_reference() -> float:
    """Text mass of a visual query in typical cross-attention: its softmax runs over text keys
    only, so all of its mass is on text (the flat line at 1 in the paper's Fig. 2)."""
    return 1.0


class Recorder:
    """Collects text-mass telemetry per denoising step and attention layer.

    Install it with :func:`record` (or ``attach`` + ``taca.telemetry.recording``). Steps are
    counted by a forward pre-hook on the transformer: a call whose timestep differs from the
    previous call's starts a new step; extra calls at the same timestep (FLUX true CFG, SD3
    skip-layer guidance) join that step, their samples appended along the batch axis. Events
    from attention calls without text (SD3.5's image-only ``attn2``) are ignored.

    gammas: counterfactual gammas evaluated on the same q, k (1.0 gives "without gamma").
    token_indices: text-token positions for attention maps (0-based inside the text block).
    grid: (h, w) of the image tokens, the first h*w visual tokens, for the maps.
    """

    def __init__(self, gammas: Sequence[float] = (1.0,), token_indices: Optional[Sequence[int]] = None,
                 grid: Optional[Tuple[int, int]] = None):
        self.gammas = [float(g) for g in gammas]
        self.token_indices = None if token_indices is None else [int(j) for j in token_indices]
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.step = -1
        self.sigmas: List[Optional[float]] = []
        self.layers: List[str] = []
        self._layer_idx: Dict[str, int] = {}
        self._rows: Dict[Tuple[int, int], List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._call = 0  # transformer calls within the current step
        self._maps: Dict[int, Tuple[torch.Tensor, int]] = {}
        self._hooks: list = []
        self.text_len = 0
        self.n_visual = 0

    def attach(self, pipe_or_transformer) -> "Recorder":
        """Count steps with a forward pre-hook on the transformer (of a pipeline or itself)."""
        tr = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
        from . import models

        a = models.adapter_class(getattr(tr, "_orig_mod", tr))
        convention = a.timestep if a is not None else "sigma"

        def hook(module, args, kwargs):
            t = kwargs.get("timestep")
            sigma = None
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                sigma = models.sigma_of(float(t.reshape(-1)[0].float()), convention)
            elif isinstance(t, (int, float)):
                sigma = models.sigma_of(t, convention)
            if self.step >= 0 and sigma is not None and self.sigmas[self.step] == sigma:
                self._call += 1
                return
            self.step += 1
            self._call = 0
            self.sigmas.append(sigma)
        self._hooks.append(tr.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __call__(self, ev: AttentionEvent) -> None:
        if ev.text_len <= 0 or ev.text_len >= ev.q.shape[2]:
            return
        step = max(self.step, 0)
        while len(self.sigmas) <= step:
            self.sigmas.append(None)
        if ev.name not in self._layer_idx:
            self._layer_idx[ev.name] = len(self.layers)
            self.layers.append(ev.name)
        li = self._layer_idx[ev.name]
        B, H, N, _ = ev.q.shape
        self.text_len, self.n_visual = ev.text_len, N - ev.text_len
        with torch.no_grad():
            tm = _visual(ev.text_mass, ev.text_len, ev.text_first).float().mean(dim=(1, 2))
            g = torch.as_tensor(ev.gamma, dtype=torch.float32, device=tm.device).reshape(-1).expand(B)
            if self.gammas:
                cf = counterfactual_text_mass(
                    ev.q, ev.k, ev.lse, ev.text_mass, text_len=ev.text_len, text_first=ev.text_first,
                    scale=ev.scale, gammas=self.gammas,
                ).mean(dim=(2, 3))
            else:
                cf = torch.empty(0, B)
            calls = self._rows.setdefault((step, li), [])
            if len(calls) > self._call:  # the same module twice in one call: keep the last
                calls[self._call] = (tm.detach(), g.detach().clone(), cf.detach())
            else:
                calls.append((tm.detach(), g.detach().clone(), cf.detach()))
            if self.token_indices:
                p = text_token_probs(
                    ev.q, ev.k, ev.lse, text_len=ev.text_len, text_first=ev.text_first,
                    gamma=ev.gamma, scale=ev.scale, token_indices=self.token_indices,
                ).sum(-1).mean(1)  # (B, N_vis)
                acc = self._maps.get(step)
                self._maps[step] = (p if acc is None else acc[0] + p, 1 if acc is None else acc[1] + 1)

    def result(self) -> TextMassTelemetry:
        """Stack everything recorded so far into a :class:`TextMassTelemetry` (on the CPU)."""
        S, L = len(self.sigmas), len(self.layers)
        if not self._rows:
            raise RuntimeError(
                "taca: no attention events were recorded; is TACA enabled on this pipeline "
                "(taca.enable(pipe, gamma=1.0) records the baseline)?"
            )
        rows = {}
        for key, calls in self._rows.items():  # calls at one timestep: samples side by side
            rows[key] = tuple(torch.cat([c[i].cpu() for c in calls], dim=-1) for i in range(3))
        B = max(r[0].shape[0] for r in rows.values())
        nan = float("nan")
        mass = torch.full((S, L, B), nan)
        gam = torch.full((S, L, B), nan)
        cf = {g: torch.full((S, L, B), nan) for g in self.gammas}
        for (s, li), (tm, g, c) in rows.items():
            b = tm.shape[0]
            mass[s, li, :b] = tm
            gam[s, li, :b] = g
            for gi, gg in enumerate(self.gammas):
                cf[gg][s, li, :b] = c[gi]
        maps = None
        if self.token_indices and self._maps:
            nv = next(iter(self._maps.values()))[0].shape[-1]
            maps = torch.full((S, B, nv), nan)
            for s, (acc, cnt) in self._maps.items():
                maps[s] = (acc / cnt).float().cpu()
            if self.grid is not None:
                h, w = self.grid
                if h * w > nv:
                    raise ValueError(f"taca: grid={self.grid} has more cells than the {nv} visual tokens")
                maps = maps[..., : h * w].reshape(S, B, h, w)
        return TextMassTelemetry(
            sigmas=list(self.sigmas), layers=list(self.layers), mass=mass, gamma=gam,
            counterfactual=cf, maps=maps, text_len=self.text_len, n_visual=self.n_visual,
            token_indices=self.token_indices,
        )


@contextlib.contextmanager
def record(pipe_or_transformer, gammas: Sequence[float] = (1.0,), token_indices: Optional[Sequence[int]] = None,
           grid: Optional[Tuple[int, int]] = None) -> Iterator[Recorder]:
    """Record text-mass telemetry (and optional attention maps) during the block.

    pipe_or_transformer: a diffusers FLUX/SD3 pipeline or transformer with TACA enabled
    (``taca.enable(pipe, gamma=1.0)`` for a baseline that is recorded but unchanged).
    Yields the :class:`Recorder`; call ``.result()`` after the pipeline call.
    """
    rec = Recorder(gammas=gammas, token_indices=token_indices, grid=grid).attach(pipe_or_transformer)
    try:
        with recording(rec):
            yield rec
    finally:
        rec.detach()


def map_difference(taca_tel: TextMassTelemetry, base_tel: TextMassTelemetry) -> torch.Tensor:
    """TACA-minus-baseline attention maps, (S, B, h, w) (or (S, B, N_vis) without grid).

    Both runs must use the same seed, prompt, steps and token_indices (paper Fig. 3).
    """
    if taca_tel.maps is None or base_tel.maps is None:
        raise ValueError("taca: both telemetries need maps; record them with token_indices=[...]")
    if taca_tel.maps.shape != base_tel.maps.shape:
        raise ValueError(f"taca: map shapes differ: {tuple(taca_tel.maps.shape)} vs {tuple(base_tel.maps.shape)}")
    return taca_tel.maps - base_tel.maps


def token_indices(pipe, prompt: str, words: Sequence[str]) -> List[int]:
    """Positions inside the text block of the tokens of ``words`` in ``prompt``.

    FLUX: the T5 tokens (``tokenizer_2``) that form the text block. SD3/SD3.5: the CLIP
    tokens (positions 0..76), then the T5 tokens after ``tokenizer.model_max_length``.
    Matching is case-insensitive on the decoded token with SentencePiece/BPE markers stripped.
    """
    wanted = {w.lower() for w in words}
    sd3 = "StableDiffusion3" in type(pipe).__name__
    found: List[int] = []
    toks = [("tokenizer", 0)] if sd3 else [("tokenizer_2", 0)]
    if sd3 and getattr(pipe, "tokenizer_3", None) is not None:
        toks.append(("tokenizer_3", int(pipe.tokenizer.model_max_length)))
    for attr, offset in toks:
        tok = getattr(pipe, attr, None)
        if tok is None:
            continue
        ids = tok(prompt)["input_ids"]
        for pos, i in enumerate(ids):
            piece = tok.convert_ids_to_tokens(int(i)).replace("\u2581", "").replace("</w>", "").lower()
            if piece in wanted:
                found.append(offset + pos)
    if not found:
        raise ValueError(f"taca: none of words={list(words)} is a token of the prompt {prompt!r}")
    return found


def plot_text_mass(curves: Dict[str, Union[TextMassTelemetry, torch.Tensor]], layers: Optional[Sequence[int]] = None,
                   layer_names: Optional[Sequence[str]] = None, title: str = "",
                   baseline: Optional[str] = None, ylim: Optional[Tuple[float, float]] = (0.0, 1.1)):
    """Figure-2-style plot: text mass of image queries per step, one panel per chosen layer.

    curves: label -> TextMassTelemetry (its in-effect mass, mean over samples) or an (S, L) tensor.
    layers: layer indices to plot (default: up to 4, evenly spaced). The typical cross-attention
    level (1.0) is drawn in each panel. baseline: the label of the gamma = 1 curve; if given, a
    second row shows every curve divided by it (how much gamma raises the text mass).
    Returns a matplotlib Figure (Agg; nothing is shown).
    """
    from matplotlib.figure import Figure

    data = {k: (v.mass.nanmean(-1) if isinstance(v, TextMassTelemetry) else v) for k, v in curves.items()}
    L = next(iter(data.values())).shape[1]
    if layers is None:
        layers = sorted({round(i * (L - 1) / 3) for i in range(4)}) if L > 1 else [0]
    rows = 2 if baseline is not None else 1
    fig = Figure(figsize=(3.0 * len(layers) + 0.6, 2.7 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, len(layers), squeeze=False, sharex=True,
                        gridspec_kw={"height_ratios": [0.8, 1.2][:rows] if rows == 2 else [1]})
    styles = {}
    for i, label in enumerate(data):
        # "*" curves are evaluations on another run's q, k: dotted, drawn on top
        ls, lw, z = ("--", 1.8, 2) if "paper" in label else (":", 1.8, 3) if label.endswith("*") else ("-", 1.4, 2)
        styles[label] = dict(ls=ls, lw=lw, zorder=z, color=f"C{i}")
    for c, li in enumerate(layers):
        ax = axes[0, c]
        ax.axhline(cross_attention_reference(), color="k", lw=1.2, ls=":", label="typical cross-attention")
        for label, v in data.items():
            ax.plot(range(v.shape[0]), v[:, li].numpy(), label=label, **styles[label])
        name = layer_names[li] if layer_names is not None else f"layer {li}"
        ax.set_title(name, fontsize=9)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if baseline is not None:
            ax2 = axes[1, c]
            ref = data[baseline][:, li]
            for label, v in data.items():
                ax2.plot(range(v.shape[0]), (v[:, li] / ref).numpy(), label=label, **styles[label])
            ax2.grid(alpha=0.3)
        axes[-1, c].set_xlabel("denoising step")
    axes[0, 0].set_ylabel("text mass of image queries\n(relative to cross-attention)", fontsize=9)
    if baseline is not None:
        axes[1, 0].set_ylabel(f"relative to {baseline}", fontsize=9)
    axes[0, -1].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_attention_maps(maps_base: torch.Tensor, maps_taca: torch.Tensor, steps: Sequence[int], sample: int = 0,
                        title: str = ""):
    """Figure-3-style plot: baseline, TACA and TACA-minus-baseline maps for the chosen steps.

    maps_*: (S, B, h, w) from :attr:`TextMassTelemetry.maps` (recorded with a grid).
    Returns a matplotlib Figure (Agg), rows baseline / TACA / difference.
    """
    from matplotlib.figure import Figure

    if maps_base.dim() != 4:
        raise ValueError("taca: maps must be (S, B, h, w); record them with grid=(h, w)")
    diff = maps_taca - maps_base
    fig = Figure(figsize=(1.9 * len(steps) + 0.8, 5.6), layout="constrained")
    axes = fig.subplots(3, len(steps), squeeze=False)
    vmax = float(torch.stack([maps_base[list(steps), sample], maps_taca[list(steps), sample]]).max())
    dmax = float(diff[list(steps), sample].abs().max()) or 1.0
    for c, s in enumerate(steps):
        for r, (m, cmap, lo, hi) in enumerate(((maps_base, "viridis", 0, vmax), (maps_taca, "viridis", 0, vmax),
                                               (diff, "RdBu_r", -dmax, dmax))):
            im = axes[r, c].imshow(m[s, sample].numpy(), cmap=cmap, vmin=lo, vmax=hi)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(f"step {s}", fontsize=9)
            if c == len(steps) - 1:
                fig.colorbar(im, ax=axes[r, c], shrink=0.8)
    for r, name in enumerate(("baseline", "TACA", "TACA - baseline")):
        axes[r, 0].set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Write a Figure from this module to ``path`` with the Agg canvas; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path
