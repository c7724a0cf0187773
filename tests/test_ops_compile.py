"""taca.joint_attention under torch.compile(fullgraph=True): no graph breaks, no recompiles
when gamma (a tensor) changes value, forward and backward equal to eager."""
import pytest
import torch
import torch._dynamo

import taca
from taca import ops


@pytest.fixture
def no_recompiles():
    torch._dynamo.reset()
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        yield
    finally:
        torch._dynamo.config.error_on_recompile = old
        torch._dynamo.reset()


def _inputs(B=2, H=2, N=24, D=16, layout="bnhd"):
    # diffusers-style views of one fused projection
    base = torch.randn(B, N, 3, H, D)
    q, k, v = base.unbind(2)
    if layout == "bhnd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return [t.detach().requires_grad_() for t in (q, k, v)]


def _run(fn, q, k, v, gamma, *extra):
    out = fn(q, k, v, gamma, *extra)
    out = out[0] if isinstance(out, tuple) else out
    dout = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out, *grads)


@pytest.mark.parametrize(
    "backend,compile_backend",
    [
        pytest.param("auto", "inductor", marks=pytest.mark.skipif(not ops.HAVE_KERNELS, reason="taca._C not built")),
        ("sdpa", "aot_eager"),
    ],
)
def test_compiled_matches_eager_without_recompiles(backend, compile_backend, no_recompiles):
    def f(q, k, v, gamma):
        return taca.joint_attention(q, k, v, text_len=5, text_first=False, gamma=gamma,
                                    gamma_reverse=1.1, layout="bnhd", backend=backend)

    cf = torch.compile(f, fullgraph=True, backend=compile_backend)
    q, k, v = _inputs()
    for g in ([1.0, 1.0], [1.2, 1.5], [2.0, 0.5]):
        gamma = torch.tensor(g)
        got = _run(cf, q, k, v, gamma)
        want = _run(f, q, k, v, gamma)
        for a, b, nm in zip(got, want, ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(a, b, msg=lambda m: f"gamma={g} {nm}: {m}")


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="taca._C not built")
def test_compiled_kernel_with_lse_text_mass_and_0d_gamma(no_recompiles):
    def f(q, k, v, gamma):
        return taca.joint_attention(q, k, v, text_len=7, gamma=gamma, layout="bhnd",
                                    return_lse=True, return_text_mass=True)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = _inputs(layout="bhnd")
    for g in (1.0, 1.3, 3.0):
        gamma = torch.tensor(g)
        got, want = cf(q, k, v, gamma), f(q, k, v, gamma)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(_run(cf, q, k, v, gamma), _run(f, q, k, v, gamma))


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="taca._C not built")
def test_compiled_kernel_nondeterministic_flag(no_recompiles):
    """deterministic=False travels through the op's schema into the compiled backward; the CPU
    kernel is deterministic either way, so the gradients equal the eager default's bitwise."""
    def f(q, k, v, gamma):
        return taca.joint_attention(q, k, v, text_len=7, gamma=gamma, layout="bhnd", deterministic=False)

    def g(q, k, v, gamma):
        return taca.joint_attention(q, k, v, text_len=7, gamma=gamma, layout="bhnd")

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = _inputs(layout="bhnd")
    gamma = torch.tensor(1.3)
    torch.testing.assert_close(cf(q, k, v, gamma), g(q, k, v, gamma), rtol=0, atol=0)
    for a, b in zip(_run(cf, q, k, v, gamma), _run(g, q, k, v, gamma)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="taca._C not built")
@pytest.mark.parametrize("text_first", [True, False])
def test_dynamic_shapes_compile_once(text_first, no_recompiles):
    # Sequence and text lengths vary (other resolutions, other prompts): text_begin/text_end
    # are SymInt in the schemas, so one dynamic graph serves them all.
    def f(q, k, v, gamma, L):
        return taca.joint_attention(q, k, v, text_len=L, text_first=text_first, gamma=gamma, layout="bnhd")

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for N, L in ((20, 5), (33, 7), (40, 11)):
        q, k, v = _inputs(N=N)
        gamma = torch.tensor([1.2, 1.4])
        torch.testing.assert_close(_run(cf, q, k, v, gamma, L), _run(f, q, k, v, gamma, L))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not ops.HAVE_CUDA_KERNEL, reason="taca._C built without CUDA kernels")
def test_compiled_cuda_kernel_without_recompiles(no_recompiles):
    def f(q, k, v, gamma):
        return taca.joint_attention(q, k, v, text_len=77, text_first=False, gamma=gamma, layout="bnhd")

    cf = torch.compile(f, fullgraph=True)
    base = torch.randn(2, 333, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.detach().requires_grad_() for t in base.unbind(2))
    for g in ([1.0, 1.0], [1.2, 1.5], [2.0, 0.5]):
        gamma = torch.tensor(g, device="cuda")
        out_c, out_e = cf(q, k, v, gamma), f(q, k, v, gamma)
        torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
        dout = torch.randn_like(out_e)
        got = torch.autograd.grad(out_c, (q, k, v), dout)
        want = torch.autograd.grad(out_e, (q, k, v), dout)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
