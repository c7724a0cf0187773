"""From-scratch training of the miniature (transformer + text encoder, all parameters).

    python -m taca.mini.pretrain --out runs/mini [--resume runs/mini] [--max-seconds 480] [--device cuda]
    python -m taca.mini.pretrain export --ckpt runs/mini --out taca/mini/weights --dtype bfloat16
    python -m taca.mini.pretrain samples --ckpt runs/mini --out samples.png
    python -m taca.mini.pretrain curves --log runs/mini/log.jsonl --out curves.png

Flow matching on scenes rendered on the fly (``taca.mini.data.SceneSampler`` on the training
device): x_t = (1 - sigma) x0 + sigma noise, target noise - x0, MSE; sigma logit-normal(0, 1)
then shifted like the sampler (``--sigma-shift``, default 3, the scheduler's shift), so training
spends its time where sampling does. Captions are dropped (replaced by "") with probability
``--caption-dropout`` for classifier-free guidance. AdamW, linear warm-up, constant learning
rate, optional linear cool-down to 0 between ``--cooldown-start`` and ``--total-steps``;
gradient clipping; bf16 autocast on CUDA; optional ``torch.compile`` of the transformer; an EMA
of the weights (used for evaluation and export).

A run stops at ``--max-steps`` or when ``--max-seconds`` of wall-clock time have passed since
the process started (a GPU call lasts at most 10 minutes), then saves a checkpoint. The next
invocation resumes from it with ``--resume`` (it may be a different folder than ``--out``).
Checkpoint folder (every file < 16 MiB for the 3.8M-parameter model):

- ``model.safetensors``: the weights, float32 (``transformer.*``, ``text_encoder.*``)
- ``ema.safetensors``: the EMA weights, float32
- ``optim.safetensors``: AdamW's moments in bfloat16 (halves the size; the next loss after a
  resume is exactly the one the uninterrupted run would have had, later ones differ by rounding)
- ``state.json``: step, the random generator's state, configs, arguments, elapsed time
- ``log.jsonl``: one JSON object per line: {"kind": "train", step, loss, lr, s_per_step, ...}
  and {"kind": "eval", step, per-category accuracy with Wilson intervals, ...}

Evaluation every ``--eval-every`` steps and at the end: the EMA model generates the first
``--eval-per-category`` prompts of each category of the committed eval set
(``taca.mini.data.eval_subset``, fixed seeds), the judge scores them.
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from . import data as D
from . import judge as J

_T0 = time.time()
CKPT_FILES = ("model.safetensors", "ema.safetensors", "optim.safetensors", "state.json")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m taca.mini.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint folder to write (created)")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from (default: --out if it has one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny test configs (CPU smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--total-steps", type=int, default=0, help="with --cooldown-start: the step where lr reaches 0")
    p.add_argument("--cooldown-start", type=int, default=0, help="step where the linear cool-down starts (0: none)")
    p.add_argument("--max-steps", type=int, default=0, help="stop at this global step (0: no limit)")
    p.add_argument("--max-seconds", type=float, default=0, help="stop after this much wall-clock time (0: no limit)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (0: no EMA)")
    p.add_argument("--sigma-shift", type=float, default=3.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--prefetch", type=int, default=8,
                   help="steps of data (scenes, noise, sigma) drawn at once: fewer host syncs on a GPU")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=2000, help="0: only at the end")
    p.add_argument("--eval-per-category", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for name in ("batch", "log_every", "prefetch"):
        if getattr(a, name) < 1:
            raise SystemExit(f"taca.mini.pretrain: --{name.replace('_', '-')} must be >= 1")
    if a.lr <= 0:
        raise SystemExit("taca.mini.pretrain: --lr must be > 0")
    if a.cooldown_start and a.total_steps <= a.cooldown_start:
        raise SystemExit("taca.mini.pretrain: --total-steps must be > --cooldown-start")
    if not 0 <= a.caption_dropout < 1:
        raise SystemExit("taca.mini.pretrain: --caption-dropout must be in [0, 1)")
    if not 0 <= a.ema < 1:
        raise SystemExit("taca.mini.pretrain: --ema must be in [0, 1)")
    return a


def named_params(pipe) -> Dict[str, torch.nn.Parameter]:
    """The trainable parameters by name ("transformer.*", "text_encoder.*"); tied weights once."""
    out: Dict[str, torch.nn.Parameter] = {}
    for prefix in ("transformer", "text_encoder"):
        for k, v in getattr(pipe, prefix).named_parameters():
            out[f"{prefix}.{k}"] = v
    return out


def lr_at(step: int, a: argparse.Namespace) -> float:
    """Learning rate at a (0-based) step: linear warm-up, constant, optional linear cool-down."""
    lr = a.lr * min(1.0, (step + 1) / max(1, a.warmup))
    if a.cooldown_start and step >= a.cooldown_start:
        lr *= max(0.0, 1 - (step - a.cooldown_start) / (a.total_steps - a.cooldown_start))
    return lr


class Trainer:
    """State of one pretraining run: pipeline, optimizer, EMA, random generator, step.

    ``step()`` runs one optimizer step on a fresh batch and returns its loss (a Python float).
    ``loss_on(x0, ids, mask, sigma, noise)`` is the loss of a given batch (no update).
    """

    def __init__(self, a: argparse.Namespace, pipe=None):
        from . import model as M

        self.a = a
        self.device = torch.device(a.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            # DESIGN.md's pitfall: cuDNN's SDPA backward failed for small heads on torch 2.11 + CUDA 13
            torch.backends.cuda.enable_cudnn_sdp(False)
        tcfg = M.TINY_TRANSFORMER_CONFIG if a.tiny else M.MINI_TRANSFORMER_CONFIG
        ecfg = M.TINY_TEXT_CONFIG if a.tiny else M.MINI_TEXT_CONFIG
        self.pipe = pipe if pipe is not None else M.build_pipeline(seed=a.seed, transformer_config=tcfg, text_config=ecfg)
        self.pipe.to(self.device)
        self.pipe.transformer.train()
        self.pipe.text_encoder.train()
        self.params = named_params(self.pipe)
        plist = list(self.params.values())
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(plist, lr=a.lr, betas=(0.9, 0.99), weight_decay=a.weight_decay, fused=fused)
        self.ema = [p.detach().clone().float() for p in plist] if a.ema > 0 else None
        self.sampler = D.SceneSampler(seed=a.seed, device=self.device)
        self.generator = self.sampler.generator  # one stream: scenes, captions dropped, sigma, noise
        tok = self.pipe.tokenize(self.sampler.table.captions, device=self.device)
        self.tok_ids, self.tok_mask = tok["input_ids"], tok["attention_mask"]
        empty = self.pipe.tokenize([""], device=self.device)
        self.empty_ids, self.empty_mask = empty["input_ids"][0], empty["attention_mask"][0]
        self.step_count = 0
        self.elapsed = 0.0
        # data is drawn a.prefetch steps at a time; a checkpoint stores the generator state at the
        # start of the current chunk and the position in it, so a resume redraws the same chunk
        self._chunk = None
        self._chunk_state = None
        self._chunk_pos = 0
        self.autocast = self.device.type == "cuda"
        if a.compile:
            self.pipe.transformer.compile(dynamic=False)

    def sample_batch(self, n: int):
        """(x0 (n, 3, 32, 32), ids (n, L), mask (n, L), sigma (n,), noise like x0), all from the run's generator."""
        g = self.generator
        b = self.sampler.batch(n)
        ids, mask = self.tok_ids[b.spec_idx], self.tok_mask[b.spec_idx]
        drop = torch.rand(n, generator=g, device=self.device) < self.a.caption_dropout
        ids = torch.where(drop[:, None], self.empty_ids[None], ids)
        mask = torch.where(drop[:, None], self.empty_mask[None], mask)
        u = torch.sigmoid(torch.randn(n, generator=g, device=self.device))
        s = self.a.sigma_shift
        sigma = s * u / (1 + (s - 1) * u)
        noise = torch.randn(b.images.shape, generator=g, device=self.device)
        return b.images, ids, mask, sigma, noise

    def next_batch(self):
        """The next training batch (a ``sample_batch`` tuple of ``a.batch`` rows), from the current chunk."""
        n, k = self.a.batch, self.a.prefetch
        if self._chunk is None or self._chunk_pos >= k:
            self._chunk_state = self.generator.get_state()
            self._chunk = self.sample_batch(n * k)
            self._chunk_pos = 0
        i = self._chunk_pos
        self._chunk_pos += 1
        return tuple(t[i * n:(i + 1) * n] for t in self._chunk)

    def loss_on(self, x0, ids, mask, sigma, noise) -> torch.Tensor:
        """Flow-matching MSE of one batch (differentiable)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            cond = self.pipe.encode_tokens(ids, mask)
            x0 = self.pipe.encode_images(x0)
            s = sigma.view(-1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            pred = self.pipe.predict(xt, sigma, cond)
        return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())

    def step(self, batch=None) -> torch.Tensor:
        """One optimizer step on ``batch`` (a ``sample_batch`` tuple; default the next one).
        Returns the loss, a detached 0-d tensor on the device (no host sync)."""
        lr = lr_at(self.step_count, self.a)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self.loss_on(*(batch if batch is not None else self.next_batch()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.a.grad_clip)
        self.opt.step()
        if self.ema is not None:
            d = min(self.a.ema, (1 + self.step_count) / (10 + self.step_count))
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params.values()], 1 - d)
        self.step_count += 1
        return loss.detach()

    # checkpoints
    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        names = list(self.params)
        tensors = {k: p.detach().float().cpu().contiguous() for k, p in self.params.items()}
        _atomic(folder, "model.safetensors", lambda f: save_file(tensors, f))
        if self.ema is not None:
            ema = {k: e.cpu().contiguous() for k, e in zip(names, self.ema)}
            _atomic(folder, "ema.safetensors", lambda f: save_file(ema, f))
        opt: Dict[str, torch.Tensor] = {}
        opt_step = 0
        for i, p in enumerate(self.params.values()):
            st = self.opt.state.get(p)
            if st:
                opt[f"exp_avg.{names[i]}"] = st["exp_avg"].detach().to(torch.bfloat16).cpu().contiguous()
                opt[f"exp_avg_sq.{names[i]}"] = st["exp_avg_sq"].detach().to(torch.bfloat16).cpu().contiguous()
                opt_step = int(st["step"])
        _atomic(folder, "optim.safetensors", lambda f: save_file(opt, f))
        state = {
            "step": self.step_count, "opt_step": opt_step, "elapsed": self.elapsed,
            "generator": _b64(self._chunk_state if self._chunk is not None else self.generator.get_state()),
            "chunk_pos": self._chunk_pos if self._chunk is not None else 0,
            "device_type": self.device.type, "args": vars(self.a), "params": self.n_params(),
            "transformer_config": dict(self.pipe.transformer.config),
            "text_config": self.pipe.text_encoder.config.to_dict(),
        }
        _atomic(folder, "state.json", lambda f: open(f, "w").write(json.dumps(state, indent=1, default=str)))

    def load(self, folder: str) -> None:
        from safetensors.torch import load_file

        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
        model = load_file(os.path.join(folder, "model.safetensors"))
        _check_keys(model, self.params, "model.safetensors")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(model[k])
        ema_path = os.path.join(folder, "ema.safetensors")
        if self.ema is not None:
            src = load_file(ema_path) if os.path.exists(ema_path) else model
            for e, k in zip(self.ema, self.params):
                e.copy_(src[k])
        opt = load_file(os.path.join(folder, "optim.safetensors"))
        if opt:
            fused = self.device.type == "cuda"
            for k, p in self.params.items():
                self.opt.state[p] = {
                    # fused AdamW keeps its step count on the parameter's device, the others on the CPU
                    "step": torch.tensor(float(state["opt_step"]), device=p.device if fused else "cpu"),
                    "exp_avg": opt[f"exp_avg.{k}"].to(p.device, torch.float32),
                    "exp_avg_sq": opt[f"exp_avg_sq.{k}"].to(p.device, torch.float32),
                }
        gstate = torch.tensor(list(base64.b64decode(state["generator"])), dtype=torch.uint8)
        old = state.get("args", {})
        same_data = old.get("batch") == self.a.batch and old.get("prefetch", 1) == self.a.prefetch
        pos = int(state.get("chunk_pos", 0))
        if state.get("device_type") == self.device.type:
            self.generator.set_state(gstate)
            if pos and same_data:  # redraw the chunk the saved run was in, continue after its last batch
                self.next_batch()
                self._chunk_pos = pos
        else:  # another kind of device: a different random stream, reseeded from the step
            self.generator.manual_seed(self.a.seed + 1_000_003 * state["step"])
        self.step_count = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))

    def n_params(self) -> Dict[str, int]:
        from . import model as M

        return M.count_parameters(self.pipe)

    # evaluation
    @torch.no_grad()
    def evaluate(self, per_category: int, steps: int, guidance: float) -> Dict[str, Any]:
        """Judge accuracy of the EMA weights (the live weights without EMA) on the first
        ``per_category`` eval prompts of each category."""
        prompts = D.eval_subset(per_category)
        live = None
        if self.ema is not None:
            live = [p.detach().clone() for p in self.params.values()]
            for p, e in zip(self.params.values(), self.ema):
                p.data.copy_(e.to(p.dtype))
        self.pipe.transformer.eval()
        self.pipe.text_encoder.eval()
        verdicts = []
        try:
            for i in range(0, len(prompts), 512):
                chunk = prompts[i:i + 512]
                gens = [torch.Generator(self.device).manual_seed(int(p["seed"])) for p in chunk]
                # eager for evaluation: new batch shapes and no_grad would each cost a recompile
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast), \
                        torch.compiler.set_stance("force_eager"):
                    imgs = self.pipe([p["caption"] for p in chunk], num_inference_steps=steps, guidance_scale=guidance,
                                     generator=gens, output_type="latent").images
                verdicts += J.judge(imgs.float(), [p["caption"] for p in chunk])
        finally:
            if live is not None:
                for p, v in zip(self.params.values(), live):
                    p.data.copy_(v)
            self.pipe.transformer.train()
            self.pipe.text_encoder.train()
        acc = J.accuracy(verdicts)
        return {"kind": "eval", "step": self.step_count, "guidance": guidance, "steps": steps,
                "ema": self.ema is not None, "accuracy": acc}


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(bytes(state.cpu().tolist())).decode()


def _atomic(folder: str, name: str, write) -> None:
    tmp = os.path.join(folder, name + ".tmp")
    write(tmp)
    os.replace(tmp, os.path.join(folder, name))


def _check_keys(got: Dict[str, torch.Tensor], want: Dict[str, Any], what: str) -> None:
    missing = sorted(set(want) - set(got))
    if missing:
        raise ValueError(f"taca.mini.pretrain: {what} lacks {len(missing)} tensors (e.g. {missing[0]}): "
                         "a checkpoint of another configuration? (--tiny must match)")


def run(a: argparse.Namespace) -> Dict[str, Any]:
    """Train until --max-steps or --max-seconds, then save to --out. Returns a summary dict."""
    resume = a.resume
    if resume is None and os.path.exists(os.path.join(a.out, "state.json")):
        resume = a.out
    tr = Trainer(a)
    os.makedirs(a.out, exist_ok=True)
    log_path = os.path.join(a.out, "log.jsonl")
    if resume:
        if not os.path.exists(os.path.join(resume, "state.json")):
            raise SystemExit(f"taca.mini.pretrain: --resume {resume} has no state.json")
        tr.load(resume)
        src_log = os.path.join(resume, "log.jsonl")
        if os.path.abspath(src_log) != os.path.abspath(log_path) and os.path.exists(src_log):
            shutil.copyfile(src_log, log_path)
    log = open(log_path, "a")

    def write(rec: Dict[str, Any]) -> None:
        log.write(json.dumps(rec) + "\n")
        log.flush()

    n = tr.n_params()
    write({"kind": "start", "step": tr.step_count, "resumed_from": resume, "device": str(tr.device),
           "gpu": torch.cuda.get_device_name(tr.device) if tr.device.type == "cuda" else None,
           "torch": torch.__version__, "params": n, "args": vars(a)})
    print(f"taca.mini.pretrain: {n['total'] / 1e6:.2f}M parameters, step {tr.step_count}, device {tr.device}", flush=True)

    def do_eval() -> None:
        if a.no_eval:
            return
        for g in a.eval_guidance:
            t = time.time()
            rec = tr.evaluate(a.eval_per_category, a.eval_steps, g)
            rec["seconds"] = round(time.time() - t, 2)
            write(rec)
            accs = " ".join(f"{k} {v['acc']:.3f}" for k, v in rec["accuracy"].items())
            print(f"eval step {tr.step_count} guidance {g}: {accs} ({rec['seconds']} s)", flush=True)

    bar = None
    if not a.no_progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(initial=tr.step_count, total=a.max_steps or None, mininterval=5, file=sys.stdout)
        except ImportError:
            bar = None
    pending: List[torch.Tensor] = []  # losses since the last log, still on the device
    t_last = time.time()
    steps_last = tr.step_count
    first_loss = last_loss = None
    reserve = 0.0  # seconds kept for the final eval and save (measured on the fly)

    def flush(final: bool = False) -> None:
        nonlocal pending, t_last, steps_last, first_loss, last_loss
        if not pending:
            return
        vals = torch.stack(pending).float().cpu().tolist()  # the one host sync per log interval
        first_loss = vals[0] if first_loss is None else first_loss
        last_loss = vals[-1]
        mean = sum(vals) / len(vals)
        now = time.time()
        rec = {"kind": "train", "step": tr.step_count, "loss": mean, "lr": lr_at(tr.step_count - 1, a),
               "samples": tr.step_count * a.batch, "wall": round(now - _T0, 1)}
        if not final:
            rec["s_per_step"] = round((now - t_last) / max(1, tr.step_count - steps_last), 4)
        if not all(math.isfinite(v) for v in vals):
            write({**rec, "kind": "error"})
            raise SystemExit(f"taca.mini.pretrain: non-finite loss before step {tr.step_count}; not saving "
                             "(the previous checkpoint stays; try a lower --lr)")
        write(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.4f}", s_step=f"{rec.get('s_per_step', 0):.3f}")
        pending, t_last, steps_last = [], now, tr.step_count

    while True:
        if a.max_steps and tr.step_count >= a.max_steps:
            break
        if a.max_seconds and time.time() - _T0 + reserve >= a.max_seconds:
            break
        t_step = time.time()
        pending.append(tr.step())
        tr.elapsed += time.time() - t_step
        if bar is not None:
            bar.update(1)
        if tr.step_count % a.log_every == 0:
            flush()
        if a.eval_every and tr.step_count % a.eval_every == 0 and not a.no_eval:
            t = time.time()
            do_eval()
            reserve = max(reserve, time.time() - t)
            t_last = time.time()
    if bar is not None:
        bar.close()
    flush(final=True)
    if not (a.eval_every and tr.step_count % a.eval_every == 0):
        do_eval()
    tr.save(a.out)
    write({"kind": "saved", "step": tr.step_count, "wall": round(time.time() - _T0, 1)})
    log.close()
    print(f"taca.mini.pretrain: saved step {tr.step_count} to {a.out} ({time.time() - _T0:.0f} s)", flush=True)
    return {"step": tr.step_count, "first_loss": first_loss, "last_loss": last_loss}


def pipeline_from_checkpoint(ckpt: str, ema: bool = True):
    """A float32 ``MiniPipeline`` with a checkpoint's EMA (or live) weights. Returns (pipe, state)."""
    from safetensors.torch import load_file
    from transformers import T5Config

    from . import model as M

    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    tcfg = {k: v for k, v in state["transformer_config"].items() if not k.startswith("_")}
    pipe = M.build_pipeline(transformer_config=tcfg, text_config=T5Config(**state["text_config"]).to_dict())
    src = "ema.safetensors" if ema and os.path.exists(os.path.join(ckpt, "ema.safetensors")) else "model.safetensors"
    weights = load_file(os.path.join(ckpt, src))
    params = named_params(pipe)
    _check_keys(weights, params, src)
    with torch.no_grad():
        for k, prm in params.items():
            prm.copy_(weights[k])
    state["weights"] = src
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    return pipe, state


def export(argv: List[str]) -> None:
    """``export --ckpt DIR --out DIR [--dtype bfloat16] [--no-ema]``: a MiniPipeline folder
    (``save_pretrained``) from a checkpoint's EMA (or live) weights."""
    p = argparse.ArgumentParser(prog="python -m taca.mini.pretrain export")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--no-ema", action="store_true")
    e = p.parse_args(argv)
    pipe, state = pipeline_from_checkpoint(e.ckpt, ema=not e.no_ema)
    pipe.to(getattr(torch, e.dtype))
    pipe.save_pretrained(e.out)
    with open(os.path.join(e.out, "README.md"), "w") as f:
        f.write(model_card(e.ckpt, state, e.dtype))
    print(f"taca.mini.pretrain: exported step {state['step']} ({state['weights']}, {e.dtype}) to {e.out}")


def model_card(ckpt: str, state: Dict[str, Any], dtype: str) -> str:
    """A short model card (markdown): data, model, training and the last judge scores from the
    checkpoint's log.jsonl."""
    a = state.get("args", {})
    n = state.get("params", {})
    recs = []
    log = os.path.join(ckpt, "log.jsonl")
    if os.path.exists(log):
        with open(log) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    lines = [
        "# taca miniature (MiniPipeline)", "",
        "A small MM-DiT trained from scratch on taca.mini's synthetic compositional scenes (32x32 RGB, "
        "1-3 objects, 7 colors, 3 shapes, counts and spatial relations); see docs/mini.md.", "",
        f"- Model: FluxTransformer2DModel in pixel space ({n.get('transformer', '?')} parameters) + "
        f"T5EncoderModel ({n.get('text_encoder', '?')}), weights stored in {dtype} ({state.get('weights')}).",
        f"- Training: {state.get('step')} steps of batch {a.get('batch')} "
        f"({state.get('step', 0) * (a.get('batch') or 0):,} scenes), AdamW lr {a.get('lr')}, "
        f"EMA {a.get('ema')}, caption dropout {a.get('caption_dropout')}, sigma shift {a.get('sigma_shift')}.",
    ]
    if train:
        lines.append(f"- Final training loss (mean of the last log interval): {train[-1]['loss']:.4f}.")
    if evals:
        lines += ["", "Judge accuracy (95% Wilson intervals) at the last evaluation:", "",
                  "| step | guidance | " + " | ".join(D.CATEGORIES) + " | all |",
                  "|---|---|" + "---|" * (len(D.CATEGORIES) + 1)]
        last = max(r["step"] for r in evals)
        for r in [r for r in evals if r["step"] == last]:
            acc = r["accuracy"]
            cells = [f"{acc[c]['acc']:.3f} [{acc[c]['lo']:.3f}, {acc[c]['hi']:.3f}] (n={acc[c]['n']})" if c in acc else "-"
                     for c in (*D.CATEGORIES, "all")]
            lines.append(f"| {r['step']} | {r['guidance']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def samples(argv: List[str]) -> None:
    """``samples --ckpt DIR --out FILE.png [--per-category 8] [--guidance 3] [--steps 28] [--device cpu]``:
    a grid of generations for the first eval prompts of each category (a row per category),
    each image framed green when the judge accepts it, red otherwise; prints the accuracies."""
    p = argparse.ArgumentParser(prog="python -m taca.mini.pretrain samples")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-category", type=int, default=8)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e = p.parse_args(argv)
    from PIL import Image

    pipe, state = pipeline_from_checkpoint(e.ckpt)
    pipe.to(e.device)
    prompts = D.eval_subset(e.per_category)
    caps = [x["caption"] for x in prompts]
    gens = [torch.Generator(e.device).manual_seed(int(x["seed"])) for x in prompts]
    with torch.no_grad():
        img = pipe(caps, num_inference_steps=e.steps, guidance_scale=e.guidance, generator=gens,
                   output_type="latent").images.float()
    verdicts = J.judge(img, caps)
    u8 = D.to_uint8(img)
    n, k = len(D.CATEGORIES), e.per_category
    grid = torch.zeros(3, n * 36, k * 36, dtype=torch.uint8)
    for i, v in enumerate(verdicts):
        r, c = divmod(i, k)
        frame = torch.tensor([40, 200, 40] if v.ok else [220, 40, 40], dtype=torch.uint8)[:, None, None]
        grid[:, r * 36:(r + 1) * 36, c * 36:(c + 1) * 36] = frame
        grid[:, r * 36 + 2:r * 36 + 34, c * 36 + 2:c * 36 + 34] = u8[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).resize((k * 108, n * 108), Image.NEAREST).save(e.out)
    acc = J.accuracy(verdicts)
    print(f"taca.mini.pretrain: step {state['step']} samples -> {e.out}; rows {', '.join(D.CATEGORIES)}; "
          + " ".join(f"{c} {a['acc']:.2f}" for c, a in acc.items()))


def curves(argv: List[str]) -> None:
    """``curves --log DIR/log.jsonl --out FILE.png``: the training loss (per log interval, log
    scale) and the judge's accuracy per category at each evaluation, against the step; the
    steps where a run resumed are drawn as vertical lines."""
    p = argparse.ArgumentParser(prog="python -m taca.mini.pretrain curves")
    p.add_argument("--log", required=True, help="a pretraining log.jsonl")
    p.add_argument("--out", required=True, help="the figure to write (.png, .pdf, .svg)")
    e = p.parse_args(argv)
    if not os.path.isfile(e.log):
        raise SystemExit(f"taca.mini.pretrain curves: --log {e.log} is not a file")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(e.log) if line.strip()]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    if not train:
        raise SystemExit(f"taca.mini.pretrain curves: --log {e.log} has no training records")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2)
    ax1.set_yscale("log")
    ax1.set(xlabel="step (batch %s)" % recs[0].get("args", {}).get("batch", "?"),
            ylabel="flow-matching loss (log scale)", title="training loss")
    for g in sorted({r["guidance"] for r in evals}):
        rows = [r for r in evals if r["guidance"] == g]
        for c, style in zip((*D.CATEGORIES, "all"), ("-o", "-s", "-^", "-v", "-D", "k-*")):
            ax2.plot([r["step"] for r in rows], [r["accuracy"][c]["acc"] for r in rows], style, ms=4,
                     lw=2 if c == "all" else 1, label=c if len(evals) == len(rows) else f"{c}, guidance {g}")
    ax2.set(xlabel="step", ylabel="judge accuracy", ylim=(0, 1.02),
            title="judge accuracy (%d prompts per category)" % (evals[0]["accuracy"][D.CATEGORIES[0]]["n"] if evals else 0))
    ax2.legend(fontsize=8, loc="lower right")
    for r in recs:
        if r["kind"] == "start" and r.get("resumed_from"):
            for ax in (ax1, ax2):
                ax.axvline(r["step"], color="0.6", ls=":", lw=1)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.savefig(e.out, dpi=120)
    print(f"taca.mini.pretrain: curves of {len(train)} log intervals and {len(evals)} evaluations -> {e.out}")


_COMMANDS = {"export": export, "samples": samples, "curves": curves}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _COMMANDS:
        _COMMANDS[argv[0]](argv[1:])
        return 0
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
