"""benchmarks/compare_settings.py: the paired difference of one method between two
quality.py workdirs, seed by seed on the same examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _workdir(root: Path, seeds: list[int], rank: int) -> Path:
    for s in seeds:
        out = root / f"seed-{s}/reports/eval/recpo"
        out.mkdir(parents=True)
        rows = [f"{split},{i},{rank if i % 2 else 50}" for split in ("valid", "test") for i in range(20)]
        (out / "ranks.csv").write_text("split,example_id,rank\n" + "\n".join(rows) + "\n")
    return root


def _run(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/compare_settings.py"), str(a), str(b)],
                          capture_output=True, text=True, check=False)


def test_b_ranking_half_the_targets_first_is_ahead_by_half_on_every_seed(tmp_path: Path) -> None:
    a = _workdir(tmp_path / "a", [0, 1, 2], rank=50)
    b = _workdir(tmp_path / "b", [0, 1, 2], rank=1)
    out = _run(a, b)
    assert out.returncode == 0, out.stderr
    assert "| test | 20 | +0.5000 | +" in out.stdout
    assert "3 of 3 |" in out.stdout


def test_folders_with_different_seeds_are_refused(tmp_path: Path) -> None:
    out = _run(_workdir(tmp_path / "a", [0, 1], rank=5), _workdir(tmp_path / "b", [0, 2], rank=5))
    assert out.returncode != 0
    assert "different seeds" in out.stderr
