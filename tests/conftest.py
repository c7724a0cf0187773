"""Shared pytest fixtures and markers for taca's tests.

- Tests run offline: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set before anything imports
  diffusers or transformers.
- ``requires_cuda``: skip marker for tests that need a CUDA GPU (CI has none).
- Every test starts from ``torch.manual_seed(0)``.
- ``one_thread``: run a test with torch (and the C kernels, which follow
  ``torch.get_num_threads()``) on one thread; for tests that call tiny ops thousands of
  times (gradcheck, opcheck), where thread start-up costs more than the work.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


DOC_SNIPPETS = pytest.StashKey[list]()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.stash[DOC_SNIPPETS] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # tests/test_docs.py: which documentation snippets ran and which were only parsed, and why
    rows = config.stash.get(DOC_SNIPPETS, [])
    if rows:
        terminalreporter.section("documentation snippets")
        for row in rows:  # in the order the tests ran: file by file, top to bottom
            terminalreporter.write_line(row)


@pytest.fixture
def doc_report(request):
    """A list the documentation tests append their one-line verdicts to (printed at the end)."""
    return request.config.stash[DOC_SNIPPETS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """``spy(owner, name)`` replaces ``owner.name`` (a function, or a method of a class) for the test by a wrapper that
    calls it through and appends each call's ``(args, kwargs)`` to the list it returns (``monkeypatch.undo()`` or the
    test's end restores it)."""

    def install(owner, name):
        calls = []
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append((args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
        return calls

    return install


@pytest.fixture(scope="session")
def chroma_folder(tmp_path_factory):
    """A tiny saved ChromaPipeline (T5 from the tiny FLUX pipeline, a 1+1-block transformer): a family beyond
    FLUX.1 / SD3 for `taca generate` and `taca eval generate` (test_models_cli, test_eval_generate)."""
    pytest.importorskip("diffusers")
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    from taca.demo import build_tiny_flux_pipeline

    flux = build_tiny_flux_pipeline(seed=0)  # its tiny T5, tokenizer, VAE (1 latent channel) and scheduler
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1)
    pipe = ChromaPipeline(scheduler=flux.scheduler, vae=flux.vae, text_encoder=flux.text_encoder_2,
                          tokenizer=flux.tokenizer_2, transformer=transformer.eval())
    d = tmp_path_factory.mktemp("tinychroma")
    pipe.save_pretrained(str(d))
    return str(d)
