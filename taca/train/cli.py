"""Arguments of ``taca train`` (argparse only; the training code is imported when it runs)."""
from __future__ import annotations

import sys

_EPILOG = """\
The paper's recipe is the default: TACA on (gamma 1.2) in every training forward, timesteps only
t >= 970 of 1000, LoRA rank = alpha = 16 on the joint-attention projections, AdamW lr 1e-4,
batch 4. --no-taca trains the control LoRA (same recipe, stock attention).

Several GPUs (DDP):  accelerate launch --multi_gpu --num_processes 8 -m taca train --model ... (same arguments)
Sharded (FSDP2):     accelerate launch --config_file examples/accelerate_fsdp2.yaml --num_processes 8 -m taca train ...
Output in --out: pytorch_lora_weights.safetensors (diffusers' LoRA format), train_config.json,
log.jsonl, loss.png, checkpoints/checkpoint-<step>/ (--resume latest continues exactly).
"""


def add_parser(sub) -> None:
    import argparse

    t = sub.add_parser(
        "train", help="train a TACA LoRA (the paper's recipe) on a folder of captioned images",
        description="LoRA training with TACA on, written in diffusers' LoRA format (FLUX.1, SD3/SD3.5, FLUX.2, "
                    "Qwen-Image, Qwen-Image 2.1, Chroma, Z-Image, HiDream-I1, Lumina-Image 2.0, Krea 2, Ideogram 4, "
                    "AuraFlow, CogView4, ERNIE-Image, Ovis-Image, Bria 3.x, Bria FIBO, LongCat-Image, Nucleus-Image, "
                    "HunyuanImage 2.1, PRX; edits with reference images: FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit, "
                    "LongCat-Image-Edit).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = t.add_argument
    a("--model", required=True, help="hub id (e.g. black-forest-labs/FLUX.1-dev) or a local pipeline folder")
    a("--data", required=True, help="a folder of images with same-named .txt captions, or a .jsonl of "
                                    '{"image": path, "caption": text}; edits for FLUX.1 Kontext / FLUX.2 add '
                                    '"reference": path or "references": [paths] (the image is the result)')
    a("--out", required=True, help="output folder (refused when not empty, unless --resume or --overwrite)")
    a("--rank", type=int, default=16, help="LoRA rank (default 16)")
    a("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    a("--lora-dropout", type=float, default=0.0)
    a("--lora-targets", default="attn",
      help="attn (joint-attention projections, default), attn+ff (plus the blocks' feed-forwards), or a "
           "comma-separated list of module names (e.g. to_q,to_k,to_v)")
    a("--gamma", type=float, default=1.2, help="TACA's gamma (default 1.2)")
    a("--t-min", type=float, default=970.0, help="train timesteps t >= this, of 1000 (default 970)")
    a("--no-taca", dest="taca", action="store_false", help="the control LoRA: same recipe, stock attention")
    a("--timestep-sampling", default="uniform", choices=("uniform", "logit-normal"),
      help="law of t inside [t-min, 1000] (default uniform)")
    a("--logit-mean", type=float, default=0.0)
    a("--logit-std", type=float, default=1.0)
    a("--loss-weighting", default="none", choices=("none", "sigma_sqrt", "cosmap"))
    a("--precondition-outputs", action="store_true", help="SD3 only: x0 target with pred = x_t - sigma * out")
    a("--guidance", type=float, default=3.5, help="guidance embedding of guidance-distilled FLUX models (default 3.5)")
    a("--lr", type=float, default=1e-4)
    a("--lr-scheduler", default="constant",
      choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"))
    a("--lr-warmup-steps", type=int, default=0)
    a("--weight-decay", dest="adam_weight_decay", type=float, default=1e-4)
    a("--max-grad-norm", type=float, default=1.0)
    a("--batch-size", type=int, default=4, help="per process (default 4, the paper's)")
    a("--grad-accum", type=int, default=1)
    a("--max-steps", type=int, default=1000, help="optimizer steps (default 1000)")
    a("--resolution", type=int, default=1024, help="square training resolution, a multiple of 16 (default 1024)")
    a("--reference-resolution", type=int, default=None,
      help="square side of an edit's reference images (default: what the pipeline feeds at inference: 1024 for "
           "FLUX.1 Kontext, Qwen-Image-Edit and LongCat-Image-Edit, --resolution for FLUX.2)")
    a("--no-center-crop", dest="center_crop", action="store_false", help="crop the top-left square instead")
    a("--max-sequence-length", type=int, default=None, help="text tokens (default: the pipeline's; at most what the model takes)")
    a("--mixed-precision", default="bf16", choices=("no", "bf16", "fp16"),
      help="weights and autocast dtype (default bf16; use no on the CPU)")
    a("--gradient-checkpointing", action="store_true")
    a("--attention-backend", default="auto", choices=("auto", "cpu", "cuda", "sdpa", "reference"),
      help="taca.joint_attention backend on the TACA path (default auto: taca's kernels)")
    a("--nondeterministic", dest="deterministic", action="store_false",
      help="let the CUDA attention backward add dQ with unordered atomics (no faster than the default since its "
           "skew; gradients then differ in the last bits from run to run)")
    a("--seed", type=int, default=0)
    a("--checkpoint-every", type=int, default=500)
    a("--checkpoints-total-limit", type=int, default=3, help="keep the newest K checkpoints (default 3)")
    a("--log-every", type=int, default=1)
    a("--cache-dir", default=None, help="latent / text-embedding cache (default <out>/cache)")
    a("--resume", default=None, help="'latest' or a checkpoint folder")
    a("--overwrite", action="store_true", help="replace what an earlier run wrote in --out")
    a("--report-to", default="auto", choices=("auto", "tensorboard", "none"),
      help="auto: TensorBoard when installed (logs in <out>/logs)")
    a("--device", default=None, choices=("cpu", "cuda"), help="default: what accelerate picks")
    t.set_defaults(func=cmd_train)


def config_from_args(args):
    from .config import TrainConfig

    keys = [k for k in TrainConfig.__dataclass_fields__ if k != "extra"]
    return TrainConfig(**{k: getattr(args, k) for k in keys if hasattr(args, k)})


def cmd_train(args) -> int:
    from .config import ConfigError

    try:
        cfg = config_from_args(args)
        from .loop import ModelNotFound, train

        train(cfg)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except ModelNotFound as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0
