"""The miniature's TACA experiment (the paper's Table 4 and Figure 2, in miniature).

    python -m taca.mini.experiment --pipeline MINI_DIR [--taca-lora DIR] [--control-lora DIR] --out DIR

Every condition generates the same prompts with the same seeds (the committed eval set,
``--per-category`` prompts of each category) and the rule-based judge scores each image;
accuracies come with Wilson 95% intervals, and each condition is compared with the baseline on
the same prompts (paired: images the condition fixed / broke, exact two-sided sign test).

Conditions:
- ``baseline``: stock attention;
- ``gamma=g``: training-free TACA, the paper's rule (gamma g while sigma >= 0.97);
- ``taca-lora``: gamma 1.2 with the LoRA trained by ``taca train`` (TACA on), active exactly in
  the gamma steps, as the paper uses it;
- ``control-lora``: the LoRA trained identically with ``--no-taca``, active in the same steps
  (sigma >= 0.97), stock attention: what fine-tuning alone does;
- ``control-lora+gamma``: that control LoRA with gamma 1.2 (does it matter that the LoRA was
  trained with TACA on?).

Figure 2: the text mass of image queries per step and layer, recorded on ``--mass-prompts``
prompts for the baseline (with gamma 1.1 / 1.2 / 1.3 evaluated on the same q, k) and for the
TACA LoRA run. Writes ``results.json``, ``results.md``, ``text_mass.json`` and
``text_mass.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import data as D
from . import judge as J

WINDOW = 0.97


def _sign_test(fixed: int, broke: int) -> float:
    """Two-sided exact binomial p-value of ``fixed`` vs ``broke`` discordant pairs (p = 1/2)."""
    n = fixed + broke
    if n == 0:
        return 1.0
    k = min(fixed, broke)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


class _WindowLora:
    """Turns the transformer's adapters on exactly in calls with every sigma >= WINDOW."""

    def __init__(self, transformer):
        self.t = transformer
        self.h = transformer.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        on = bool((torch.as_tensor(kwargs["timestep"]).float() >= WINDOW - 1e-5).all())
        (self.t.enable_adapters if on else self.t.disable_adapters)()

    def remove(self):
        self.h.remove()
        self.t.enable_adapters()


def generate_and_judge(pipe, prompts: Sequence[Dict[str, Any]], steps: int, guidance: float, batch: int,
                       device) -> List[J.Verdict]:
    """Images for ``prompts`` (dicts with "caption", "seed") and the judge's verdicts."""
    verdicts: List[J.Verdict] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator(device).manual_seed(int(p["seed"])) for p in chunk]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
            imgs = pipe([p["caption"] for p in chunk], num_inference_steps=steps, guidance_scale=guidance,
                        generator=gens, output_type="latent").images
        verdicts += J.judge(imgs.float(), [p["caption"] for p in chunk])
    return verdicts


def run(args) -> Dict[str, Any]:
    import taca

    from .model import load_pipeline

    device = torch.device(args.device)
    pipe = load_pipeline(args.pipeline, device=device)
    prompts = D.eval_subset(args.per_category)
    t0 = time.time()

    def go(label: str) -> List[J.Verdict]:
        s = time.time()
        v = generate_and_judge(pipe, prompts, args.steps, args.guidance, args.batch, device)
        print(f"  {label}: {J.accuracy(v)['all']['acc']:.4f} all ({time.time() - s:.1f} s)", flush=True)
        return v

    results: Dict[str, List[J.Verdict]] = {"baseline": go("baseline")}
    for g in args.gammas:
        with taca.enabled(pipe, gamma=g, schedule="paper"):
            results[f"gamma={g:g}"] = go(f"gamma={g:g}")
    if args.taca_lora:
        with taca.enabled(pipe, gamma=1.2, schedule="paper", lora=args.taca_lora):
            results["taca-lora"] = go("taca-lora")
    if args.control_lora:
        from ..pipeline import _lora_file

        folder, weight = _lora_file(args.control_lora)
        pipe.load_lora_weights(folder, weight_name=weight, adapter_name="control")
        w = _WindowLora(pipe.transformer)
        try:
            results["control-lora"] = go("control-lora")
        finally:
            w.remove()
            pipe.transformer.delete_adapters("control")
        with taca.enabled(pipe, gamma=1.2, schedule="paper", lora=args.control_lora):
            results["control-lora+gamma"] = go("control-lora+gamma")

    base = results["baseline"]
    table: Dict[str, Any] = {}
    for name, verdicts in results.items():
        acc = J.accuracy(verdicts)
        fixed = sum(1 for a, b in zip(base, verdicts) if not a.ok and b.ok)
        broke = sum(1 for a, b in zip(base, verdicts) if a.ok and not b.ok)
        table[name] = {"accuracy": acc, "fixed": fixed, "broke": broke, "p_sign": _sign_test(fixed, broke)}

    mass = text_mass(pipe, prompts, args) if args.mass_prompts > 0 else None
    out = {"pipeline": os.path.abspath(args.pipeline), "taca_lora": args.taca_lora, "control_lora": args.control_lora,
           "prompts": len(prompts), "per_category": args.per_category, "steps": args.steps, "guidance": args.guidance,
           "device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "torch": torch.__version__, "seconds": time.time() - t0, "conditions": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(format_table(out) + "\n")
    if mass is not None:
        with open(os.path.join(args.out, "text_mass.json"), "w") as f:
            json.dump(mass["json"], f)
        mass["figure"].savefig(os.path.join(args.out, "text_mass.png"), dpi=110)
    print(format_table(out))
    return out


def format_table(res: Dict[str, Any]) -> str:
    cats = [c for c in D.CATEGORIES if c in res["conditions"]["baseline"]["accuracy"]] + ["all"]
    lines = [f"Miniature, {res['prompts']} prompts ({res['per_category']} per category, fixed seeds), "
             f"{res['steps']} steps, guidance {res['guidance']:g}; judge accuracy [95% Wilson interval]; "
             f"fixed / broke: images the condition got right / wrong that the baseline got wrong / right "
             f"(p: exact sign test)", "",
             "| condition | " + " | ".join(cats) + " | fixed / broke (p) |",
             "|---" * (len(cats) + 2) + "|"]
    for name, row in res["conditions"].items():
        cells = []
        for c in cats:
            a = row["accuracy"][c]
            cells.append(f"{a['acc']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]")
        fb = "-" if name == "baseline" else f"{row['fixed']} / {row['broke']} ({row['p_sign']:.2g})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fb} |")
    return "\n".join(lines)


def text_mass(pipe, prompts, args) -> Dict[str, Any]:
    """Figure 2 on the miniature: per-step text mass of image queries (mean over layers, heads,
    image queries and prompts)."""
    import taca
    import taca.analysis as ta

    device = torch.device(args.device)
    sub = [prompts[i] for i in range(0, len(prompts), max(1, len(prompts) // args.mass_prompts))][:args.mass_prompts]
    caps = [p["caption"] for p in sub]

    def call():
        gens = [torch.Generator(device).manual_seed(int(p["seed"])) for p in sub]
        pipe(caps, num_inference_steps=args.steps, guidance_scale=1.0, generator=gens, output_type="latent")

    gammas = (1.0,) + tuple(args.gammas)
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        with ta.record(pipe, gammas=gammas) as rec:
            call()
    base = rec.result()
    curves = {"gamma=1 (baseline)": base}
    js: Dict[str, Any] = {"sigmas": base.sigmas, "layers": base.layers,
                          "baseline": base.per_step().tolist(),
                          "counterfactual": {f"{g:g}": base.per_step(gamma=g).tolist() for g in args.gammas}}
    for g in args.gammas:
        curves[f"gamma={g:g} on baseline q, k*"] = base.counterfactual[g]
    if args.taca_lora:
        with taca.enabled(pipe, gamma=1.2, schedule="paper", lora=args.taca_lora):
            with ta.record(pipe, gammas=(1.2,)) as rec2:
                call()
        run2 = rec2.result()
        curves["TACA 1.2 + LoRA (paper rule)"] = run2
        js["taca_lora"] = run2.per_step().tolist()
    data = {k: (v.mass.nanmean(-1) if isinstance(v, ta.TextMassTelemetry) else v.nanmean(-1)) for k, v in curves.items()}
    fig = ta.plot_text_mass(data, layer_names=base.layers, baseline="gamma=1 (baseline)",
                            title=f"miniature: text mass of image queries per step ({len(sub)} prompts; "
                                  f"gamma on while sigma >= {WINDOW}: the first steps)")
    return {"json": js, "figure": fig}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m taca.mini.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="a MiniPipeline folder (save_pretrained / pretrain export)")
    p.add_argument("--taca-lora", default=None, help="LoRA trained by taca train with TACA on")
    p.add_argument("--control-lora", default=None, help="LoRA trained by taca train --no-taca")
    p.add_argument("--gammas", default="1.1,1.2,1.3")
    p.add_argument("--per-category", type=int, default=500, help="prompts per category (500: all 2500)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--mass-prompts", type=int, default=64, help="prompts for the text-mass figure (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.gammas = [float(x) for x in args.gammas.split(",") if x.strip()]
    for name in ("pipeline", "taca_lora", "control_lora"):
        v = getattr(args, name)
        if v is not None and not os.path.exists(v):
            p.error(f"argument --{name.replace('_', '-')}: {v} does not exist")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
