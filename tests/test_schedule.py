"""gamma schedules: the documented step table is what the real schedulers give; parsing;
per-sample gamma; the step rule counted inside real (tiny) pipeline calls."""
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from taca import schedule as S


def _doc_table():
    rows = {}
    for line in S.__doc__.splitlines():
        m = re.match(r"\s+(paper|steps:3|constant)\s+(FLUX\.1-dev|SD3 shift 3|both)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", line)
        if m:
            rows[(m.group(1), m.group(2))] = m.group(3, 4, 5)
    return rows


def _fmt(steps, n):
    if steps == list(range(n)):
        return "all"
    assert steps == list(range(steps[0], steps[-1] + 1)), steps
    return f"{steps[0]}-{steps[-1]}"


def test_docstring_table_is_computed_from_real_schedulers():
    pytest.importorskip("diffusers")
    table = _doc_table()
    assert len(table) == 4
    for (rule, model), cells in table.items():
        models = {"FLUX.1-dev": ["flux"], "SD3 shift 3": ["sd3"], "both": ["flux", "sd3"]}[model]
        for m in models:
            got = tuple(_fmt(S.window_steps(rule, m, n), n) for n in (28, 30, 50))
            assert got == cells, (rule, m, got, cells)


def test_documented_sigmas_near_threshold():
    pytest.importorskip("diffusers")
    doc = " ".join(S.__doc__.split())
    for model, label in (("flux", "FLUX"), ("sd3", "SD3")):
        for n in (28, 30, 50):
            sig = S.pipeline_sigmas(model, n).tolist()
            last_in = max(i for i, s in enumerate(sig) if s >= 0.97)
            pair = f"{n} steps {sig[last_in]:.4f} | {sig[last_in + 1]:.4f}".replace("0.", ".")
            assert pair in doc, (label, pair)


def test_paper_rule_per_sample():
    s = S.parse("paper", 1.2)
    sigma = torch.tensor([1.0, 0.97, 0.9699, 0.5, 0.0, 0.9701])
    assert s(sigma).tolist() == pytest.approx([1.2, 1.2, 1.0, 1.0, 1.0, 1.2])
    assert s(sigma).dtype == torch.float32
    s2 = S.parse("paper:0.9", 1.3)
    assert s2(torch.tensor([0.95, 0.85])).tolist() == pytest.approx([1.3, 1.0])


def test_parse_and_errors():
    assert isinstance(S.parse(None), S.PaperSchedule)
    st = S.parse("steps:3", 1.1)
    assert isinstance(st, S.StepSchedule) and st.k == 3 and st.gamma0 == 1.1
    assert st(torch.zeros(2), 2).tolist() == pytest.approx([1.1, 1.1])
    assert st(torch.zeros(2), 3).tolist() == [1.0, 1.0]
    for name in ("constant", "always", "CONSTANT"):
        c = S.parse(name, 1.4)
        assert isinstance(c, S.ConstantSchedule) and c(torch.rand(3)).tolist() == pytest.approx([1.4] * 3)
    # None and "paper" are the same rule; "none" is refused with the names to use instead
    assert repr(S.parse(None, 1.3)) == repr(S.parse("paper", 1.3)) == "PaperSchedule(gamma=1.3, threshold=0.97)"
    for name in ("none", "None", "off"):
        with pytest.raises(ValueError, match=r"ambiguous.*'constant' for gamma at every step.*'paper'"):
            S.parse(name)
    with pytest.raises(ValueError, match="paper:<sigma>"):
        S.parse("paper:high")
    fn = S.parse(lambda sig: 1.0 + 0.5 * sig)
    assert fn(torch.tensor([0.0, 1.0])).tolist() == [1.0, 1.5]
    assert S.parse(lambda sig: 2.0)(torch.zeros(2)).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="steps:<k>"):
        S.parse("steps:x")
    with pytest.raises(ValueError, match="schedule='sometimes'"):
        S.parse("sometimes")
    with pytest.raises(ValueError, match="gamma=-1.0"):
        S.parse("paper", -1.0)
    with pytest.raises(ValueError, match="threshold=2"):
        S.PaperSchedule(threshold=2)
    with pytest.raises(ValueError, match="one per sample"):
        S.parse(lambda sig: torch.ones(5))(torch.zeros(2))
    with pytest.raises(TypeError, match="schedule must be"):
        S.parse(3)
    # a schedule's own gamma wins over enable's gamma
    assert S.parse(S.PaperSchedule(gamma=1.5), 1.2).gamma0 == 1.5


def _record_gamma_steps(pipe):
    seen = []

    def rec(module, args, kwargs):
        g = kwargs["joint_attention_kwargs"]["taca_gamma"]
        seen.append(None if g is None else g.tolist())

    h = pipe.transformer.register_forward_pre_hook(rec, with_kwargs=True)
    return seen, h


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("rule", ["paper", "steps:2", "constant"])
def test_window_inside_a_pipeline_call(kind, rule):
    """The steps that get gamma in a real pipeline call equal window_steps() for that image size,
    and a second call counts steps afresh."""
    pytest.importorskip("diffusers")
    import taca
    from taca import tiny

    n = 8
    if kind == "flux":
        pipe = tiny.flux_pipeline(num_layers=1, num_single_layers=0)
        inputs = lambda: tiny.flux_inputs(pipe, height=64, width=64, num_inference_steps=n, text_len=3)  # noqa: E731
        seq = 16
    else:
        pipe = tiny.sd3_pipeline(num_layers=1)
        inputs = lambda: tiny.sd3_inputs(pipe, height=16, width=16, num_inference_steps=n, text_len=3)  # noqa: E731
        seq = 4
    taca.enable(pipe, gamma=1.2, schedule=rule)
    seen, h = _record_gamma_steps(pipe)
    try:
        pipe(**inputs())
        first = list(seen)
        seen.clear()
        pipe(**inputs())
    finally:
        h.remove()
        taca.disable(pipe)
    assert seen == first
    B = 1 if kind == "flux" else 2
    want = S.window_steps(rule, kind, n, image_seq_len=seq)
    assert [i for i, g in enumerate(first) if g is not None] == want
    assert all(g == pytest.approx([1.2] * B) for g in first if g is not None)
    if rule == "paper":
        assert 0 < len(want) < n


def test_step_counter_ignores_repeated_sigma_and_resets():
    """Transformer-only use: extra forwards at the same sigma (true CFG) are the same step;
    a sigma increase starts a new call."""
    pytest.importorskip("diffusers")
    import taca
    from taca import tiny

    t = tiny.flux_transformer(num_layers=1, num_single_layers=0)
    h = taca.enable(t, gamma=1.2, schedule="steps:2")
    g = torch.Generator().manual_seed(0)
    n, L = 4, 3
    base = dict(hidden_states=torch.randn(1, n, 4, generator=g), encoder_hidden_states=torch.randn(1, L, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(L, 3))
    steps = []
    try:
        for s in (1.0, 1.0, 0.9, 0.9, 0.8, 0.7, 1.0, 0.6):
            t(**base, timestep=torch.tensor([s]))
            steps.append((h.last_step, h.last_gamma is not None))
    finally:
        taca.disable(t)
    assert steps == [(0, True), (0, True), (1, True), (1, True), (2, False), (3, False), (0, True), (1, True)]


def test_flux_bf16_timestep_uses_the_pipelines_exact_timestep():
    """FLUX pipelines pass t / 1000 in bf16 (969.9 -> 968 -> sigma 0.96875); with the pipeline
    known, the hook uses its exact timestep instead, and ignores a stale one."""
    pytest.importorskip("diffusers")
    import taca
    from taca import tiny

    pipe = tiny.flux_pipeline(num_layers=1, num_single_layers=0)
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    n, L = 4, 3
    kw = dict(hidden_states=torch.randn(1, n, 4, generator=g), encoder_hidden_states=torch.randn(1, L, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(L, 3),
              timestep=torch.tensor([969.9]).to(torch.bfloat16) / 1000)
    assert float(kw["timestep"]) < 0.9695
    h = taca.enable(t, gamma=1.2, schedule="paper:0.9695")
    try:
        t(**kw)
        assert h.last_gamma is None  # bare transformer: only the bf16 value is known
        taca.enable(pipe, gamma=1.2, schedule="paper:0.9695")
        pipe._current_timestep = torch.tensor(969.9)
        t(**kw)
        assert h.last_gamma is not None and h.last_gamma.tolist() == pytest.approx([1.2])
        pipe._current_timestep = torch.tensor(500.0)  # stale: does not match what was passed
        t(**kw)
        assert h.last_gamma is None
    finally:
        pipe._current_timestep = None
        taca.disable(pipe)
