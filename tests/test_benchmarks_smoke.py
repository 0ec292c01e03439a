"""Every script in benchmarks/ runs a step or two on the tiny fixture and prints what it
promises: its table, its ratio line, its checks. Figures are never asserted (timings
depend on the machine); the shapes of the outputs and the scripts' own checks are.

The Python scripts run in this process (`runpy`, as `python SCRIPT ARGS` would: argv,
the script's folder on sys.path, `__main__`), which spares a torch import per script;
those that start processes of their own (quality.py's workers, load_test.py's server,
window_bench.py's stage, recpo_settings.sh) start them as they always do."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rrec.config import Params, load_params
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from tests.conftest import TINY_OVERRIDES, write_params

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# the short trainings behind the scripts that read a trained model (RecPO: its two item
# warm-up steps, then one RL step), evaluated at the start and the end only
TRAINED = {
    **TINY_OVERRIDES,
    "train.max_steps": 2,
    "train.recpo.max_steps": 3,
    "train.eval_every": 100,
    "train.eval_max_users": 8,
    "train.reward_probe_users": 0,
}


def run_script(
    name: str, *args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    env: dict[str, str] | None = None,
) -> str:
    """stdout of `python benchmarks/NAME ARGS`, run in this process."""
    path = BENCH / name
    threads = torch.get_num_threads()
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", [str(path), *args])
        m.syspath_prepend(str(BENCH))
        for key, value in (env or {}).items():
            m.setenv(key, value)
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            torch.set_num_threads(threads)  # scripts set their own thread counts
    return capsys.readouterr().out


def run_process(cmd: list[str], env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def trained(
    tiny_project: tuple[Params, Paths], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the tiny project with both methods trained for a few steps."""
    from rrec.train.run import run_train

    _, paths = tiny_project
    root = tmp_path_factory.mktemp("bench_smoke") / "project"
    shutil.copytree(
        paths.root, root, ignore=shutil.ignore_patterns("mlflow", "checkpoints", "trained")
    )
    params = write_params(root, TRAINED)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.parent / 'mlflow.db'}")
        for method in ("contrastive", "recpo"):
            run_train(params, Paths(root), method)
    return root


def table_row(out: str, first_cell: str) -> list[str]:
    """The whitespace-split cells of the line that starts with `first_cell`."""
    rows = [line for line in out.splitlines() if line.startswith(first_cell)]
    assert len(rows) == 1, out
    return rows[0][len(first_cell) :].split()


# ------------------------------------------------------------------ model benchmarks


def test_recpo_step_bench_times_rl_steps_of_both_trainers(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the project's params start RecPO with 2 item warm-up steps (no sampling): the
    # benchmark must still time RL steps (it used to fail at its first timed step)
    assert load_params(trained / "params.yaml").train.recpo.item_warmup_steps == 2
    out = run_script(
        "recpo_step_bench.py", "--project", str(trained), "--steps", "2", "--warmup", "1",
        "--batch", "2", "--group", "2", "--max-new-tokens", "4", "--threads", "1",
        "--json", str(tmp_path / "bench.json"),
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert "backbone: tiny (Qwen2ForCausalLM, 2 layers, hidden 32" in out
    assert "no LoRA (all weights trained)" in out
    assert "2 timed steps after 1 warm-up, order interleaved" in out
    assert "identical ids in TRL: True" in out
    for name in ("RecPO", "TRL GRPO"):
        cells = table_row(out, name)  # mean ± std, min, rollout, rest, seqs, tokens, mean len
        assert cells[6] == "4", out  # seqs: B*G sequences sampled in every timed step
        assert 1 <= float(cells[8]) <= 4, out  # mean completion length within the budget
    assert re.search(r"ratio TRL/RecPO, seconds per step: \d+\.\d\d", out)
    assert re.search(r"ratio TRL/RecPO of step k against step k: median \d", out)
    assert (tmp_path / "bench.json").exists()


def test_item_encoding_bench_compares_with_naive_and_ceiling(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_script(
        "item_encoding_bench.py", "--root", str(trained), "--n-items", "40", "--naive-items", "5",
        "--repeats", "1", "--threads", "1", "--backbone", "tiny",
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert "model: tiny" in out and str(trained / "data/prompts/items.parquet") in out
    assert "items: 40" in out
    assert re.search(r"naive loop\s+:\s+\d+\.\d items/s\s+\(5 items\)", out)
    assert re.search(r"encode_items / naive\s+=\s+\d+\.\d\dx", out)
    assert re.search(r"encode_items / ceiling\s+=\s+\d+\.\d\dx", out)


def test_latency_bench_unified_and_two_stage_agree(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_script(
        "latency_bench.py", "--root", str(trained), "--queries", "4", "--batch-sizes", "1", "2",
        "--warmup", "1", "--max-new-tokens", "3", "--threads", "1", "--no-compile", "--no-aot",
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    # every example of 4 sampled test users
    assert re.search(r"^recpo model, backbone 'tiny', .*; \d+ queries", out, re.M), out
    for size in ("1", "2"):
        assert re.search(rf"^\s+{size} \|.*\|\s+\d+\.\d\dx \|", out, re.M), out
    assert "same reasoning from both pipelines: True" in out
    worst = float(re.search(r"1 - cos\(h_unified, h_two_stage\): (\S+)", out).group(1))
    assert worst < 1e-4
    assert "target (>= 1.25x at batch 1" in out


def test_reasoning_cost_reads_both_ways(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_script(
        "reasoning_cost.py", "contrastive", "2", env={"ROOT": str(trained)},
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    for split in ("valid", "test"):
        assert re.search(rf"^{split} n=\d+ no reasoning: ndcg@10 \d\.\d{{4}}, reasoning length 0\.0", out, re.M)
        assert re.search(rf"^{split} n=\d+ after reasoning: ndcg@10 \d\.\d{{4}}, reasoning length [12]\.\d", out, re.M)
        assert re.search(rf"^{split}: reasoning minus none [+-]\d\.\d{{4}}", out, re.M)


def test_reasoning_cost_reads_one_way_on_one_split(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_script(
        "reasoning_cost.py", "backbone", "2", "--splits", "test", "--arms", "none",
        env={"ROOT": str(trained)}, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert re.search(r"^test n=\d+ no reasoning: ndcg@10 \d\.\d{4}, reasoning length 0\.0$", out, re.M), out
    assert "valid" not in out and "after reasoning" not in out and "minus none" not in out


def test_user_states_bench_times_the_shared_head_against_whole_prompts(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_script(
        "user_states_bench.py", "recpo", "3", "--max-users", "12",
        env={"ROOT": str(trained)}, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert re.search(r"^recpo on valid: n=12 examples, \d+ prompt tokens on average", out, re.M), out
    for label in ("right after the prompt", "after 3 reasoning tokens"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        cells = [c.strip() for c in line.split("|")]
        assert re.fullmatch(r"\d+\.\d\dx", cells[3]), line
        assert cells[4] == cells[5], line  # the same NDCG@10 both ways
        assert cells[6] == "12 of 12", line  # the same reasoning for every user
        assert float(cells[7]) < 1e-4, line


def test_backbone_table_adds_zero_shot_and_recpo_without_reasoning(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rrec.stages.evaluate import evaluate_stage

    root = tmp_path / "project"
    shutil.copytree(trained, root)
    params, paths = load_params(root / "params.yaml"), Paths(root)
    with monkeypatch.context() as m:  # the store the fixture's training runs are in
        m.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained.parent / 'mlflow.db'}")
        for method in ("contrastive", "recpo"):
            evaluate_stage(params, paths, method, register=False)
    capsys.readouterr()
    out = run_script("backbone_table.py", env={"ROOT": str(root)}, monkeypatch=monkeypatch, capsys=capsys)
    # the evaluate stage's users (evaluate.max_users), for the policies and the new rows
    n = len(load_user_prompts(paths, "test").sample_users(params.evaluate.max_users, params.seed))
    for name, reasoning, count in [
        ("popularity", "none", r"\d+"), ("random", "none", r"\d+"), ("contrastive", "none", n),
        ("zero-shot (untrained backbone)", "none", n), ("recpo", "none", n), ("recpo", "yes", n),
    ]:
        assert re.search(rf"^\| {re.escape(name)} \| {reasoning} \| {count} \| \d\.\d{{4}} \| \d\.\d{{4}} \|$",
                         out, re.M), out
    assert re.search(rf"^RecPO, reasoning minus none: [+-]\d\.\d{{4}} NDCG@10 \(95 % interval .*, n={n}\)$", out, re.M)
    assert re.search(rf"^RecPO minus contrastive: [+-]\d\.\d{{4}} NDCG@10 .*n={n}\)$", out, re.M)


def test_backbone_table_needs_an_evaluated_project(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit, match="no evaluated RecPO model"):
        run_script("backbone_table.py", env={"ROOT": str(trained)}, monkeypatch=monkeypatch, capsys=capsys)


def test_learning_curves_prints_each_evaluation(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_script(
        "learning_curves.py", "contrastive", '{"steps": 2, "every": 1}', env={"ROOT": str(trained)},
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    steps = [int(s) for s in re.findall(r'^\{"step": (\d+), "valid_ndcg10"', out, re.M)]
    assert steps == [0, 1, 2], out


def test_recpo_settings_runs_the_named_setting(trained: Path) -> None:
    out = run_process(
        ["bash", str(BENCH / "recpo_settings.sh"), "t1.0_lr3e-4_tok8"],
        env={"ROOT": str(trained), "STEPS": "1", "EVERY": "1", "PYTHON": sys.executable},
    )
    assert out.splitlines()[0] == "=== t1.0_lr3e-4_tok8"  # only the run whose name matched
    assert out.count("===") == 1
    steps = [int(s) for s in re.findall(r'^\{"step": (\d+),', out, re.M)]
    assert steps == [0, 1], out
    assert '"len": ' in out


def test_quality_then_compare_settings_and_reward_curves_on_its_workdir(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "work"
    out = run_script(
        "quality.py", "--root", str(trained), "--seeds", "0", "--workdir", str(workdir),
        "-S", "train.max_steps=1", "-S", "train.recpo.max_steps=1", "-S", "train.recpo.item_warmup_steps=0",
        "-S", "evaluate.max_users=10",
        "-S", "train.reward_probe_users=4",  # reward_curves.py reads the probe's reward
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert "seed 0 contrastive: test ndcg@10" in out and "seed 0 recpo: test ndcg@10" in out
    for name in ("contrastive", "recpo"):
        assert re.search(rf"^\| {name} \| \d+ \| \d\.\d{{4}} ± 0\.0000 \|", out, re.M), out
    assert "paired, recpo − contrastive" in out
    assert re.search(r"^\| test \| \d+ \| [+-]\d\.\d{4} \|", out, re.M)

    # the same folder against itself: the very same ranks, no difference on any seed
    same = run_script("compare_settings.py", str(workdir), str(workdir), monkeypatch=monkeypatch, capsys=capsys)
    assert re.search(r"^\| test \| \d+ \| \+0\.0000 \| \+0\.0000 … \+0\.0000 \| 0 of 1 \|", same, re.M), same

    curves = run_script("reward_curves.py", str(workdir), monkeypatch=monkeypatch, capsys=capsys)
    assert "recpo, 1 seeds (seed-0)" in curves
    assert re.search(r"^\| 0 \| 1 \| \d\.\d{4} \| \d\.\d{4} \| \d\.\d{4} \|$", curves, re.M), curves
    assert re.search(r"^\| seed-0 \| \d+ \| ", curves, re.M)


def test_load_test_serves_the_trained_model_without_errors(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_script(
        "load_test.py", "--root", str(trained), "--clients", "2", "--requests", "2",
        "--start-timeout", "240", monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert "server answering at http://127.0.0.1:" in out
    assert "2 clients x 2 requests = 4 requests" in out
    assert "errors: 0" in out
    assert re.search(r"latency ms: p50 \d+, p90 \d+, p99 \d+", out)


# ------------------------------------------------------------------ the rest


def test_window_bench_measures_the_stage_and_the_floor(tmp_path: Path) -> None:
    out = run_process([
        sys.executable, str(BENCH / "window_bench.py"), "--interactions", "3000", "--items", "400",
        "--min-items", "50", "--out", str(tmp_path / "wb"), "--repeats", "1", "--threads", "1",
    ])  # fmt: skip
    assert "stage (fresh interpreter):" in out
    stats = re.search(r"^stats: \{'users': (\d+), 'items': (\d+), 'interactions': (\d+)", out, re.M)
    assert stats is not None and all(int(n) > 0 for n in stats.groups()), out
    assert re.search(r"^ratio stage / floor: wall \d+\.\d\dx, cpu \d+\.\d\dx", out, re.M), out
    assert re.search(r"^peak RSS of the stage: \d+\.\d\d GiB", out, re.M), out


def test_orchestration_overhead_splits_a_repro_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the parse mode of a finished repro; running `dvc repro -f` itself is the pipeline's
    # own end-to-end test's business (minutes), not a smoke test's
    log = tmp_path / "repro.log"
    log.write_text("Running stage 'items':\nrrec-stage-compute items 2.5\nrrec-stage-compute train@recpo 7.5\n")
    out = run_script(
        "orchestration_overhead.py", "--log", str(log), "--wall", "12.0",
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert re.search(r"^train@recpo\s+7\.5$", out, re.M)
    assert re.search(r"^sum of stage compute\s+10\.0$", out, re.M)
    assert "orchestration + start-up: 2.0 s = 16.7 % of the wall time, 1.0 s per stage" in out


# ------------------------------------------------------------------ --backbone


@pytest.mark.parametrize(
    ("script", "args", "env"),
    [
        ("recpo_step_bench.py", ["--project", "{root}"], {}),
        ("item_encoding_bench.py", ["--root", "{root}"], {}),
        ("latency_bench.py", ["--root", "{root}"], {}),
        ("reasoning_cost.py", [], {"ROOT": "{root}"}),
        ("user_states_bench.py", [], {"ROOT": "{root}"}),
        ("learning_curves.py", ["contrastive"], {"ROOT": "{root}"}),
        ("load_test.py", ["--root", "{root}"], {}),
        ("quality.py", ["--root", "{root}"], {}),
    ],
)
def test_a_named_project_with_another_backbone_is_refused_with_the_reason(
    script: str, args: list[str], env: dict[str, str], tiny_project: tuple[Params, Paths],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    root = str(tiny_project[1].root)
    with pytest.raises(SystemExit) as err:
        run_script(
            script, *[a.format(root=root) for a in args], "--backbone", "smollm2-135m",
            env={k: v.format(root=root) for k, v in env.items()},
            monkeypatch=monkeypatch, capsys=capsys,
        )  # fmt: skip
    assert "model.backbone: tiny, not --backbone smollm2-135m" in str(err.value)
