"""benchmarks/reward_curves.py: the reward at each evaluation over the seeds of a
quality.py workdir, and each seed's change from the starting model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "step,ndcg@10,n,reward,train_reward\n"


def _seed(root: Path, seed: int, rows: list[str]) -> None:
    out = root / f"seed-{seed}/reports/eval/recpo"
    out.mkdir(parents=True)
    (out / "valid_curves.csv").write_text(HEADER + "".join(r + "\n" for r in rows))


def _run(workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/reward_curves.py"), str(workdir)],
                          capture_output=True, text=True, check=False)


def test_mean_per_step_and_the_kept_step_of_each_seed(tmp_path: Path) -> None:
    _seed(tmp_path, 0, ["0,0.01,9,0.10,0.20", "50,0.03,9,0.12,0.22", "100,0.02,9,0.11,0.21"])
    _seed(tmp_path, 1, ["0,0.01,9,0.20,0.30", "50,0.02,9,0.22,0.32", "100,0.04,9,0.25,0.35"])
    # a curve from before the probe existed (no step 0) is left out, not averaged in
    _seed(tmp_path, 2, ["50,0.02,9,0.22,0.32"])
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 seeds (seed-0, seed-1)" in out.stdout
    assert "| 0 | 2 | 0.2500 ± 0.0707 | 0.1500 ± 0.0707 | 0.0100 ± 0.0000 |" in out.stdout
    assert "| seed-0 | 50 | 0.2000 → 0.2200 / 0.2100 | 0.1000 → 0.1200 / 0.1100 |" in out.stdout
    assert "| seed-1 | 100 | 0.3000 → 0.3500 / 0.3500 | 0.2000 → 0.2500 / 0.2500 |" in out.stdout


def test_a_folder_without_curves_is_a_clear_error(tmp_path: Path) -> None:
    out = _run(tmp_path)
    assert out.returncode != 0 and "quality.py --workdir" in out.stderr
