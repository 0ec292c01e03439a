"""Every shell command in README.md and docs/*.md works as written.

Each command of a ```bash block is accepted by the program it calls: the program (and
subcommand) exists and takes every option the command uses, checked through its
`--help` (a shell script's own text). Commands that read the MLflow store name the
project's. Every command is either run as written by the slow test in
tests/test_docs_run.py on a tiny copy of the embedded default (`RUN`), or has a reason
here why only its form is checked (`FORM_ONLY`)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from rrec import tracking

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(?:bash|sh|shell)\s*\n(.*?)^```", re.M | re.S)
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")
SHELL_BUILTINS = {".", "source", "export", "cd", "kill"}
PYTHONS = {"python", "python3", "python3.11"}
ALIASES = {"exp": "experiments"}

# commands tests/test_docs_run.py runs as written (up to the substitutions it names), in
# this order
RUN = [
    "dvc repro",
    "dvc metrics show",
    "dvc plots show",
    "dvc exp show",
    "python -m flows.pipeline run",
    "rrec recommend --method recpo --history 12,40,7 --k 10",
    "rrec recommend --method recpo --input histories.jsonl --json",
    "rrec catalogue add --meta new_meta.jsonl.gz",
    "rrec catalogue remove --asin B0XXXXXXX --publish champion",
    "MLFLOW_TRACKING_URI=sqlite:///mlflow/mlflow.db mlflow models serve",
    "curl -s 127.0.0.1:5001/invocations",
    "mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db",
    "cat reports/comparison.md",
    # last: it retrains RecPO, and the champion published above is then another run's model
    "dvc exp run -S train.recpo.beta=0 -S 'train.methods=[recpo]'",
]
# commands whose form only is checked here, and why
FORM_ONLY = {
    "python3.11 -m venv": "creates the environment the tests run in",
    ". .venv/bin/activate": "shell set-up",
    "pip install": "installs packages (network); the extras are checked to exist",
    "pytest -q": "the suite itself",
    "scripts/device_check.sh": "needs a CUDA GPU (tests/test_device_check.py runs its CPU half)",
    "accelerate launch": "DeepSpeed on a GPU (docs/gpu.md)",
    "torchrun": "two training processes (tests/test_train.py runs them)",
    "scripts/real_data.sh": "needs MovieLens 100K (tests/test_real_data.py runs it on a fake copy)",
    "scripts/smollm2.sh": "the whole pipeline on SmolLM2-135M, over an hour on 2 cores (tests/test_smollm2.py runs its stages on SmolLM2 cut to two layers; tests/test_smollm2_preset.py checks its params)",
    "python scripts/real_data.py": "needs MovieLens 100K (tests/test_real_data.py)",
    "dvc exp run -S data.source=amazon2023": "the MovieLens experiment (docs/real_data.md), ~17 min",
    "prefect": "a Prefect server and worker (tests/test_flows.py runs the flows on a test server)",
    "export PREFECT_API_URL": "shell set-up",
    "PREFECT_SERVER_ANALYTICS_ENABLED=false prefect server start": "a long-running server",
}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str  # as written (continuations joined)

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    @property
    def env(self) -> dict[str, str]:
        out = {}
        for w in self.words:
            if not _ENV.match(w):
                break
            key, value = w.split("=", 1)
            out[key] = value
        return out

    @property
    def argv(self) -> list[str]:
        words = self.words
        while words and _ENV.match(words[0]):
            words = words[1:]
        return words


def commands() -> list[Command]:
    """Every command of every ```bash block: continuation lines joined, a line's `&&`
    chain split, comment lines and a trailing `&` dropped."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            first = text.count("\n", 0, m.start(1)) + 1
            lines = m.group(1).splitlines()
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1].rstrip() + " " + lines[i].strip()
                i += 1
                body = " ".join(shlex.split(line, comments=True))
                if not body:
                    continue
                for part in re.split(r"\s&&\s", line.split("  #", 1)[0]):
                    part = part.strip().removesuffix("&").strip()
                    if part:
                        out.append(Command(f"{path.name}:{first + start}", part))
    return out


def classified(cmd: Command) -> str | None:
    if any(cmd.text.startswith(r) for r in RUN):
        return "run"
    if any(cmd.text.startswith(prefix) for prefix in FORM_ONLY):
        return "form"
    return None


def test_the_docs_have_commands() -> None:
    found = {c.text.split()[0] for c in commands()}
    assert {"dvc", "rrec", "mlflow", "python"} <= found


@pytest.mark.parametrize("cmd", commands(), ids=lambda c: c.where)
def test_every_documented_command_is_run_or_says_why_not(cmd: Command) -> None:
    assert classified(cmd), (
        f"{cmd.where}: `{cmd.text}` is neither run by tests/test_docs_run.py (RUN) nor "
        "listed with a reason in FORM_ONLY (tests/test_docs_commands.py)"
    )


# ------------------------------------------------------------------ form checks


def _subcommands(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", a):
            break
        out.append(a)
    return out


def _options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", a)]


@cache
def _help(prog: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    out = subprocess.run([*prog, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout + out.stderr


def _program(argv: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """The command that shows the help for `argv`'s program and subcommands, and the
    rest of `argv` (its options and arguments)."""
    head, rest = argv[0], argv[1:]
    if head in PYTHONS:
        if rest[:1] == ["-m"]:
            return (sys.executable, "-m", rest[1]), rest[2:]
        return (sys.executable, rest[0]), rest[1:]
    if head in ("dvc", "pip", "pytest"):
        return (sys.executable, "-m", head), rest
    found = shutil.which(head, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    return (found or head,), rest


def _check_form(argv: list[str]) -> None:
    prog, rest = _program(argv)
    if prog[-1].endswith(".sh"):
        script = ROOT / argv[0]
        assert script.is_file() and os.access(script, os.X_OK), f"{argv[0]}: not an executable script"
        text = script.read_text() + "".join(p.read_text() for p in script.parent.glob(script.stem + ".py"))
        subs = _subcommands(rest)[:1]
        missing = [w for w in subs + _options(rest) if w not in text]
        assert not missing, f"{argv[0]} does not know {missing}"
        return
    for launcher in ("torchrun", "accelerate"):
        if launcher in Path(prog[0]).name and "-m" in rest:
            at = rest.index("-m")
            _check_form([launcher, *rest[:at]])
            _check_form(["python", "-m", *rest[at + 1:]])
            return
    subs = _subcommands(rest)
    status, text = _help((*prog, *subs))
    assert status == 0, f"`{' '.join(argv[:len(prog) + len(subs)])} --help` exits {status}:\n{text[-1500:]}"
    if subs:  # a program without that subcommand may still answer --help, with its own usage
        at = text.lower().index("usage:")
        usage = text[at:].split("\n", 2)[:2]
        assert ALIASES.get(subs[0], subs[0]) in " ".join(usage).split(), (
            f"`{' '.join(argv)}`: `{subs[0]}` is not a subcommand; its --help shows {usage[0].strip()!r}")
    missing = [o for o in _options(rest[len(subs):]) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    assert not missing, f"`{' '.join(argv)}`: {missing} not in its --help"


@pytest.mark.parametrize(
    "cmd", [c for c in commands() if c.argv and c.argv[0] not in SHELL_BUILTINS | {"cat", "curl"}],
    ids=lambda c: f"{c.where}:{c.argv[0]}",
)
def test_every_documented_command_takes_its_options(cmd: Command) -> None:
    _check_form(cmd.argv)


def test_pip_extras_in_the_docs_exist() -> None:
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    used = {e for c in commands() for e in re.findall(r'"\.\[(\w+)\]"', c.text)}
    assert used and used <= extras, f"the docs install extras {used - extras} that pyproject.toml lacks"


def test_mlflow_commands_read_the_projects_store() -> None:
    """`mlflow` reads its default store (./mlflow.db) unless told otherwise: every
    documented `mlflow` command names the store the stages write to, and the model
    names match the committed category."""
    store = "sqlite:///" + os.path.relpath(tracking.store_dir(ROOT) / "mlflow.db", ROOT)
    category = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["category"]
    mlflow_cmds = [c for c in commands() if c.argv[:1] == ["mlflow"]]
    assert mlflow_cmds
    for c in mlflow_cmds:
        named = c.env.get("MLFLOW_TRACKING_URI") or next(
            (c.argv[i + 1] for i, w in enumerate(c.argv) if w == "--backend-store-uri"), None)
        assert named == store, f"{c.where}: `{c.text}` reads MLflow's default store, not {store}"
        for model in re.findall(r"models:/([\w-]+)", c.text):
            assert model == f"rrec-{category}", f"{c.where}: {model} is not rrec-{category}"


def test_a_stray_mlflow_store_is_ignored() -> None:
    for stray in ("mlflow.db", "mlruns/0/meta.yaml", "dvc_plots/index.html"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", stray], cwd=ROOT)
        assert ignored.returncode == 0, f"{stray} (written by a documented command) is not git-ignored"
