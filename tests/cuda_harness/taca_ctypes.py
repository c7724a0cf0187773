"""Direct ctypes access to the CUDA forward kernel (the C ABI of csrc/taca.h), for tests and
benchmarks on a GPU machine: it runs taca_fwd_cuda without the torch binding, on
caller-allocated (poisoned) outputs, and can select internal tiling variants.

The shared library is built from csrc/cuda/taca_fwd.cu + csrc/taca_common.c by
``build(path)`` (nvcc) or by benchmarks/gpu_run.sh; ``load()`` finds it through the
TACA_CUDA_LIB environment variable. Shapes: q, k, v, out are (B, H, N, D) ("bhnd") or
(B, N, H, D) ("bnhd") views with a contiguous last dim; lse, text_mass are (B, H, N) float32.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from typing import Optional, Tuple

import torch

TACA_F32, TACA_F64, TACA_F16, TACA_BF16 = 0, 1, 2, 3
_DTYPES = {torch.float32: TACA_F32, torch.float64: TACA_F64, torch.float16: TACA_F16,
           torch.bfloat16: TACA_BF16}
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Strides(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("n", ctypes.c_int64), ("h", ctypes.c_int64)]


class Mask(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("kind", ctypes.c_int), ("b", ctypes.c_int64),
                ("h", ctypes.c_int64), ("q", ctypes.c_int64), ("k", ctypes.c_int64)]


class FwdParams(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("text_mass", ctypes.c_void_p),
        ("q_stride", Strides), ("k_stride", Strides), ("v_stride", Strides),
        ("out_stride", Strides),
        ("batch", ctypes.c_int64), ("seqlen", ctypes.c_int64), ("heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64), ("seqlen_k", ctypes.c_int64), ("heads_kv", ctypes.c_int64),
        ("text_begin", ctypes.c_int64), ("text_end", ctypes.c_int64),
        ("q_text_begin", ctypes.c_int64), ("q_text_end", ctypes.c_int64),
        ("text_spans", ctypes.c_void_p), ("mask", Mask),
        ("gamma", ctypes.c_void_p), ("gamma_reverse", ctypes.c_double), ("scale", ctypes.c_double),
        ("dtype", ctypes.c_int), ("num_threads", ctypes.c_int),
    ]


_LIB = None


def build(path: str, arch: str = "-gencode=arch=compute_90a,code=sm_90a") -> str:
    """Compile the forward kernel files (in parallel) and the shared validation into a shared
    library at path."""
    import glob

    inc = ["-I" + os.path.join(_ROOT, "csrc"), "-I" + os.path.join(_ROOT, "csrc", "cuda")]
    srcs = sorted(glob.glob(os.path.join(_ROOT, "csrc", "cuda", "taca_fwd*.cu")))
    objs, procs = [], []
    sm90 = ["-DTACA_HAVE_SM90A=1"] if "90a" in arch else []  # see setup.py
    for src in srcs:
        obj = path + "." + os.path.basename(src) + ".o"
        objs.append(obj)
        procs.append(subprocess.Popen(["nvcc", "-Xcompiler", "-fPIC", "-std=c++17", "-O3",
                                       "--use_fast_math", *inc, arch, *sm90, "-c", src, "-o", obj]))
    common = path + ".common.o"
    subprocess.run(["cc", "-O2", "-fPIC", "-std=c99", *inc[:1], "-c",
                    os.path.join(_ROOT, "csrc", "taca_common.c"), "-o", common], check=True)
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("taca_ctypes.build: nvcc failed")
    subprocess.run(["nvcc", "-shared", *objs, common, "-o", path], check=True)
    return path


def load() -> Optional[ctypes.CDLL]:
    """The library named by TACA_CUDA_LIB, or None when unset or missing."""
    global _LIB
    if _LIB is None:
        path = os.environ.get("TACA_CUDA_LIB", "")
        if not path or not os.path.exists(path):
            return None
        lib = ctypes.CDLL(path)
        lib.taca_fwd_cuda_variant.argtypes = [ctypes.POINTER(FwdParams), ctypes.c_void_p, ctypes.c_int]
        lib.taca_fwd_cuda_variant.restype = ctypes.c_int
        lib.taca_fwd_fp8_cuda_variant.argtypes = [ctypes.POINTER(FwdParams), ctypes.c_void_p, ctypes.c_size_t,
                                                  ctypes.c_void_p, ctypes.c_int]
        lib.taca_fwd_fp8_cuda_variant.restype = ctypes.c_int
        lib.taca_last_cuda_error.restype = ctypes.c_char_p
        _LIB = lib
    return _LIB


def _strides(x: torch.Tensor, layout: str) -> Strides:
    if x.stride(-1) != 1:
        raise ValueError("taca_ctypes: last dim must be contiguous")
    if layout == "bhnd":
        return Strides(x.stride(0), x.stride(2), x.stride(1))
    return Strides(x.stride(0), x.stride(1), x.stride(2))


def fwd_params(q, k, v, out, lse, tm, *, text_len, text_first=True, gamma=1.0, gamma_reverse=1.0,
               scale=None, layout="bhnd", dtype_code=None) -> Tuple["FwdParams", torch.Tensor]:
    """The taca_fwd_params of these tensors (N_q = N_k, H_kv = H), and the (B,) gamma tensor they point into
    (keep it alive, and record it on the stream, until the call completed)."""
    B = q.shape[0]
    N, H = (q.shape[2], q.shape[1]) if layout == "bhnd" else (q.shape[1], q.shape[2])
    D = q.shape[3]
    tb, te = (0, text_len) if text_first else (N - text_len, N)
    g = gamma if isinstance(gamma, torch.Tensor) else torch.full((B,), float(gamma))
    g = g.to(device=q.device, dtype=torch.float32).reshape(-1).expand(B).contiguous()
    p = FwdParams()
    p.q, p.k, p.v, p.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    p.lse = lse.data_ptr() if lse is not None else None
    p.text_mass = tm.data_ptr() if tm is not None else None
    p.q_stride, p.k_stride = _strides(q, layout), _strides(k, layout)
    p.v_stride, p.out_stride = _strides(v, layout), _strides(out, layout)
    p.batch, p.seqlen, p.heads, p.head_dim = B, N, H, D
    p.seqlen_k, p.heads_kv = N, H
    p.text_begin, p.text_end = tb, te
    p.q_text_begin, p.q_text_end = tb, te
    p.gamma = g.data_ptr()
    p.gamma_reverse = float(gamma_reverse)
    p.scale = float(D ** -0.5 if scale is None else scale)
    p.dtype = _DTYPES[q.dtype] if dtype_code is None else dtype_code
    p.num_threads = 0
    return p, g


def fwd_status(q, k, v, out, lse, tm, *, variant=0, **kw) -> int:
    """Call taca_fwd_cuda_variant on caller-provided tensors (fwd_params' arguments); returns the taca_status."""
    p, g = fwd_params(q, k, v, out, lse, tm, **kw)
    st = load().taca_fwd_cuda_variant(ctypes.byref(p), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                                      variant)
    g.record_stream(torch.cuda.current_stream())
    return st


def fwd_fp8_status(q, k, v, out, lse, tm, workspace, *, variant=0, **kw) -> int:
    """Call taca_fwd_fp8_cuda_variant with a caller-provided workspace (a CUDA uint8 tensor), so its quantized
    inputs can be read back; returns the taca_status."""
    p, g = fwd_params(q, k, v, out, lse, tm, **kw)
    st = load().taca_fwd_fp8_cuda_variant(ctypes.byref(p), ctypes.c_void_p(workspace.data_ptr()), workspace.numel(),
                                          ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), variant)
    g.record_stream(torch.cuda.current_stream())
    return st


def fwd(q, k, v, *, text_len, text_first=True, gamma=1.0, gamma_reverse=1.0, scale=None,
        layout="bhnd", variant=0, out=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the kernel on NaN-poisoned outputs; returns (out, lse, text_mass)."""
    B = q.shape[0]
    N, H = (q.shape[2], q.shape[1]) if layout == "bhnd" else (q.shape[1], q.shape[2])
    if out is None:
        out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, N), float("nan"), device=q.device)
    tm = torch.full((B, H, N), float("nan"), device=q.device)
    st = fwd_status(q, k, v, out, lse, tm, text_len=text_len, text_first=text_first, gamma=gamma,
                    gamma_reverse=gamma_reverse, scale=scale, layout=layout, variant=variant)
    if st != 0:
        raise RuntimeError(f"taca_fwd_cuda failed with status {st}: {load().taca_last_cuda_error().decode()}")
    return out, lse, tm


if __name__ == "__main__":
    import sys

    print(build(sys.argv[1]))
