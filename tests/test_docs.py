"""Every fenced snippet in README.md and docs/*.md runs as written, or is marked and parsed.

A fence is ```python, ```bash or ```text (synopses, output); anything else fails here, so no
snippet goes unchecked. A python or bash fence runs, offline, in a fresh folder:

- python: in a subprocess with this interpreter (HF_HUB_OFFLINE=1, matplotlib's Agg backend);
  it must exit 0 and print no warnings;
- bash, line by line (backslash continuations joined, comments dropped): ``taca ...`` and
  ``.venv/bin/taca ...`` through ``taca.cli.main`` in-process, ``python ...`` with this
  interpreter, ``make TARGET`` as ``make -n TARGET`` (the target exists; running it here would
  run the suite inside itself), ``source .venv/bin/activate`` as a check that the file is there.

A fence right after ``<!-- needs: hub-weights -->`` (FLUX.1-dev / SD3.5 weights, not
downloadable here) or ``<!-- needs: minutes -->`` (a benchmark, a training run) is only parsed:
python with ``compile()`` plus a check that every ``taca.<name>`` / ``ta.<name>`` it uses exists,
bash by parsing every ``taca`` line (also after ``accelerate launch ... -m``, whose options go
through accelerate's parser) with the real argparse parser; ``hf download`` lines are listed as
not run, ``python -m MODULE`` lines are checked to name a module. The terminal summary lists each
snippet with what was done to it.
"""
import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from taca import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
NEEDS = re.compile(r"<!--\s*needs:\s*([\w-]+)\s*-->\s*$")
KNOWN_NEEDS = {"hub-weights": "needs FLUX.1 / SD3.5 hub weights", "minutes": "a benchmark: a minute or more"}
LANGS = ("python", "bash", "text")


@dataclass
class Snippet:
    path: str
    line: int
    lang: str
    body: str
    needs: Optional[str]

    @property
    def id(self):
        return f"{self.path}:{self.line}:{self.lang}:" + ("run" if self.needs is None else f"parse[{self.needs}]")


def _snippets():
    out = []
    for rel in DOCS:
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        for m in FENCE.finditer(text):
            before = text[: m.start()].rstrip("\n").splitlines()
            mark = NEEDS.search(before[-1]) if before else None
            out.append(Snippet(rel, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2),
                               mark.group(1) if mark else None))
    return out


SNIPPETS = _snippets()
CODE = [s for s in SNIPPETS if s.lang in ("python", "bash")]


def test_every_fence_is_classified():
    bad = [f"{s.path}:{s.line}: ```{s.lang}" for s in SNIPPETS if s.lang not in LANGS]
    assert not bad, f"fences must be one of {LANGS} (so each one is run, parsed or plainly not code): {bad}"
    bad = [f"{s.path}:{s.line}: needs {s.needs}" for s in SNIPPETS if s.needs not in (None, *KNOWN_NEEDS)]
    assert not bad, f"unknown <!-- needs: ... --> marks (known: {sorted(KNOWN_NEEDS)}): {bad}"
    bad = [f"{s.path}:{s.line}" for s in SNIPPETS if s.lang == "text" and s.needs]
    assert not bad, f"text fences are never run; a needs mark on them means nothing: {bad}"
    # the documentation must keep runnable examples, not only marked ones
    assert sum(s.needs is None for s in CODE) >= 6, [s.id for s in CODE]


def _logical_lines(body: str):
    for line in re.sub(r"\\\n\s*", " ", body).splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            yield tokens


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _check_python_names(snippet: Snippet):
    """Every attribute the snippet takes from a taca module exists (the API has not moved on)."""
    tree = ast.parse(snippet.body)
    modules = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "taca" or a.name.startswith("taca."):
                    modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else "taca"
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            name = modules[node.value.id]
            if not hasattr(importlib.import_module(name), node.attr):
                try:  # a submodule such as taca.numpy, bound by ``import taca.numpy``
                    importlib.import_module(f"{name}.{node.attr}")
                except ImportError:
                    missing.append(f"{node.value.id}.{node.attr}")
    assert not missing, f"{snippet.id}: names not in taca: {missing}"
    return len(modules)


def _run_taca(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # --help, or an argparse error
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("snippet", CODE, ids=[s.id for s in CODE])
def test_snippet(snippet, tmp_path, monkeypatch, capsys, doc_report):
    monkeypatch.chdir(tmp_path)
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    if snippet.lang == "python":
        compile(snippet.body, snippet.id, "exec")
        _check_python_names(snippet)
        if snippet.needs:
            doc_report.append(f"{snippet.id}: parsed only ({KNOWN_NEEDS[snippet.needs]}): compile() and taca names")
            return
        script = tmp_path / "snippet.py"
        script.write_text(snippet.body)
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                           cwd=tmp_path, env=_env())
        assert r.returncode == 0, f"{snippet.id} failed:\n{r.stderr[-4000:]}"
        assert "Warning" not in r.stderr, f"{snippet.id} printed warnings:\n{r.stderr[-4000:]}"
        doc_report.append(f"{snippet.id}: executed")
        return

    done = []
    for tokens in _logical_lines(snippet.body):
        cmd, rest = tokens[0], tokens[1:]
        if cmd == "taca" or cmd.endswith("/bin/taca"):
            if snippet.needs:
                try:
                    args = cli.parse_args(rest)
                except SystemExit as e:
                    pytest.fail(f"{snippet.id}: `{' '.join(tokens)}` does not parse (exit {e.code}): "
                                f"{capsys.readouterr().err}")
                assert args.command == rest[0]
                done.append(f"parsed `taca {rest[0]}`")
            else:
                rc, out, err = _run_taca(rest, capsys)
                assert rc == 0, f"{snippet.id}: `{' '.join(tokens)}` exited {rc}:\n{err[-4000:]}"
                assert "Traceback" not in err and "Warning" not in err, err[-4000:]
                assert out.strip(), f"`{' '.join(tokens)}` printed nothing"
                done.append(f"ran `{' '.join(tokens)}`")
        elif snippet.needs and cmd == "accelerate" and rest[:1] == ["launch"] and "taca" in rest:
            # accelerate's own parser takes its options; what follows -m taca goes through ours
            from accelerate.commands.launch import launch_command_parser

            launch_command_parser().parse_args(rest[1:])
            args = cli.parse_args(rest[rest.index("taca") + 1:])
            done.append(f"parsed `accelerate launch ... -m taca {args.command}`")
        elif snippet.needs and cmd == "hf":
            assert rest[:1] in (["download"], ["auth"]), f"{snippet.id}: unexpected `hf {' '.join(rest[:1])}`"
            done.append(f"not run (network): `hf {rest[0]}`")
        elif snippet.needs and cmd == "python" and rest[:1] == ["-m"]:
            import importlib.util

            assert importlib.util.find_spec(rest[1]) is not None, f"{snippet.id}: no module {rest[1]}"
            done.append(f"checked `python -m {rest[1]}` exists")
        elif snippet.needs:
            pytest.fail(f"{snippet.id}: only taca, accelerate launch -m taca, hf and python -m commands can be "
                        f"parsed; move `{' '.join(tokens)}` out of the marked fence")
        elif cmd == "python":
            r = subprocess.run([sys.executable, *rest], capture_output=True, text=True, timeout=300, env=_env())
            assert r.returncode == 0, f"{snippet.id}: `{' '.join(tokens)}`:\n{r.stderr[-4000:]}"
            assert r.stdout.strip()
            done.append(f"ran `{' '.join(tokens)}`")
        elif cmd == "make":
            r = subprocess.run(["make", "-n", *rest], capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert r.returncode == 0, f"{snippet.id}: `make -n {' '.join(rest)}`: {r.stderr}"
            done.append(f"dry-ran `make -n {' '.join(rest)}`")
        elif cmd == "source":
            venv = os.path.join(ROOT, os.path.dirname(os.path.dirname(rest[0])))
            if not os.path.isdir(venv):
                pytest.skip(f"{snippet.id}: no {venv} in this checkout (make demo creates it)")
            assert os.path.isfile(os.path.join(ROOT, rest[0])), rest[0]
            for prog in ("taca", "python"):
                assert os.access(os.path.join(venv, "bin", prog), os.X_OK), f"{venv}/bin/{prog} missing"
            done.append(f"checked `{' '.join(tokens)}` (file and its taca, python)")
        else:
            pytest.fail(f"{snippet.id}: no rule to run `{cmd}`; add one to tests/test_docs.py")
    assert done, f"{snippet.id}: no command in the fence"
    kind = f"parsed only ({KNOWN_NEEDS[snippet.needs]})" if snippet.needs else "executed"
    doc_report.append(f"{snippet.id}: {kind}: " + "; ".join(done))


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("rel", DOCS)
def test_links_resolve_inside_the_repository(rel):
    path = os.path.join(ROOT, rel)
    with open(path) as f:
        text = f.read()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        dest = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
        if not dest.startswith(ROOT + os.sep) or not os.path.exists(dest):
            broken.append(target)
    assert not broken, f"{rel}: links that do not resolve inside the repository: {broken}"
    # paths of the machine the docs were written on mean nothing to a reader
    assert not re.search(r"(?<![\w.])/(work|home|root|tmp)/", text), f"{rel} cites a path outside the repository"


def test_make_demo_says_how_to_use_the_environment():
    # after `make demo` a new user types `taca ...`: the Makefile says where taca is
    r = subprocess.run(["make", "-n", "demo"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "source .venv/bin/activate" in r.stdout and ".venv/bin/taca" in r.stdout
