"""What the Prefect UI shows of a pipeline run: a stage DVC skipped in a state of its own
name, and the comparison table with links to the MLflow runs as the flow's artifact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import mlflow
import pytest
from prefect.client.orchestration import get_client

from flows.pipeline import SKIPPED_STATE, comparison_markdown, pipeline_flow
from rrec import tracking
from rrec.config import parse_params
from tests.test_flows import PIPELINE_STAGES, fake_dvc  # noqa: F401  (fixtures)


async def _task_states(flow_run_id, expected: int) -> dict[str, str]:
    """The final state of each task run of the flow run. Prefect records task runs from
    events in the background, so they appear on the server a moment after the flow
    returns: read until all `expected` are there in a final state (at most 30 s). The
    flow run is matched here, on each task run's own `flow_run_id`."""
    states: dict[str, str] = {}
    async with get_client() as client:
        for _ in range(60):
            runs = await client.read_task_runs(limit=200)
            states = {
                r.name.rsplit("-", 1)[0]: r.state.name  # names end in a run suffix
                for r in runs
                if r.flow_run_id == flow_run_id and r.state is not None and r.state.is_final()
            }
            if len(states) >= expected:
                break
            await asyncio.sleep(0.5)
    return states


async def _artifact(key: str, flow_run_id) -> str | None:
    """The artifact `key` that this flow run created (other tests' runs make their own)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        mine = [a for a in found if a.flow_run_id == flow_run_id]
        return mine[0].data if mine else None


def test_skipped_stages_are_named_and_the_run_ends_with_the_comparison(
    prefect_api: None, fake_dvc: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    reports = fake_dvc / "reports"
    reports.mkdir()
    (reports / "comparison.md").write_text("| method | ndcg@10 |\n|---|---|\n| recpo | 0.0339 |\n")
    (reports / "comparison.csv").write_text("method,n,run_id,ndcg@10\nrecpo,880,nosuchrun,0.0339\n")
    monkeypatch.setenv("FAKE_DVC_SKIP", "download,window")
    state = pipeline_flow(root=str(fake_dvc), return_state=True)
    assert state.result() == {s: ("skipped" if s in ("download", "window") else "ran") for s in PIPELINE_STAGES}
    states = asyncio.run(_task_states(state.state_details.flow_run_id, len(PIPELINE_STAGES)))
    assert states == {f"repro-{s}": (SKIPPED_STATE if s in ("download", "window") else "Completed")
                      for s in PIPELINE_STAGES}
    artifact = asyncio.run(_artifact("rrec-comparison", state.state_details.flow_run_id))
    assert artifact is not None and "| recpo | 0.0339 |" in artifact and "recpo: run nosuchrun" in artifact


def test_the_comparison_links_each_method_to_its_mlflow_run(tmp_path: Path) -> None:
    with tracking.start_run(parse_params({}), "train", run_name="recpo", root=tmp_path) as run:
        pass
    exp = run.info.experiment_id
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "comparison.md").write_text("# table\n")
    (tmp_path / "reports" / "comparison.csv").write_text(f"method,n,run_id\nrecpo,880,{run.info.run_id}\n")
    text = comparison_markdown(tmp_path)
    assert f"- recpo: [{run.info.run_id}](http://127.0.0.1:5000/#/experiments/{exp}/runs/{run.info.run_id})" in text
    mlflow.set_tracking_uri(None)
    assert comparison_markdown(tmp_path / "elsewhere").startswith("No comparison yet")
