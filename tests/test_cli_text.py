"""What `rrec recommend` prints as text: the history by title, the reasoning indented line
by line (its newlines never break the layout), the ranked items, and no loading bars."""

from __future__ import annotations

from typer.testing import CliRunner

from rrec.cli import app, render_text
from rrec.serve.recommend import Recommendation, RecommendedItem
from tests.test_serve import NOW, store, trained  # noqa: F401  (fixtures)


def test_reasoning_lines_stay_inside_the_layout() -> None:
    res = Recommendation(
        reasoning=".0.0)\n111\n", reasoning_tokens=8,
        items=[RecommendedItem(5, "B05", "Zelda", 0.91), RecommendedItem(9, "B09", "Mario Kart", 0.5)],
    )
    text = render_text(0, [(12, "B12", "Hero's Tale"), (40, "B40", "Xbox One Édition Spéciale")], res, True)
    lines = text.splitlines()
    assert lines[0] == "== request 0: history, oldest first"
    assert lines[1] == "     [12] Hero's Tale (B12)" and lines[2] == "     [40] Xbox One Édition Spéciale (B40)"
    assert lines[3] == "reasoning (8 tokens):"
    assert lines[4:6] == ["   | .0.0)", "   | 111"]
    assert lines[6] == "recommended:"
    assert lines[7].startswith("  1. [5] Zelda (B05)") and lines[8].startswith("  2. [9] Mario Kart (B09)")
    assert len(lines) == 9


def test_empty_reasoning_is_said() -> None:
    res = Recommendation(reasoning="", reasoning_tokens=0, items=[])
    assert "reasoning (0 tokens): (empty)" in render_text(1, [], res, True)
    assert "reasoning" not in render_text(1, [], res, False)


def test_cli_prints_titles_and_no_loading_bars(trained) -> None:  # noqa: F811
    params, paths = trained
    result = CliRunner().invoke(app, ["recommend", "--history", "0,1", "--k", "3", "--root", str(paths.root),
                                      "--now", str(NOW)])
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output
    from rrec.serve.catalogue import Catalogue
    from rrec.serve.recommend import serving_files

    _, catalogue_file = serving_files(paths, "recpo")
    catalogue = Catalogue.read(catalogue_file)
    for j in (0, 1):
        assert f"[{j}] {catalogue.title(j)} ({catalogue.parent_asin(j)})" in result.output


def test_the_mlflow_model_carries_an_input_example_that_it_answers(trained, tmp_path) -> None:  # noqa: F811
    import json

    import mlflow

    from rrec.serve.pyfunc import INPUT_EXAMPLE, save_pyfunc

    params, paths = trained
    out = save_pyfunc(params, paths, "recpo", tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(out))
    info = model.metadata.saved_input_example_info
    assert info is not None and json.loads((out / info["artifact_path"]).read_text())
    assert model.metadata.signature is None  # the model checks its input itself
    answer = model.predict(INPUT_EXAMPLE)
    assert len(answer) == 1 and len(answer[0]["items"]) == 5


def test_logging_a_model_into_a_finished_run_keeps_its_duration(trained, store, monkeypatch) -> None:  # noqa: F811
    import json

    from mlflow import MlflowClient

    from rrec.model.loading import TRAIN_SUMMARY
    from rrec.serve.pyfunc import log_pyfunc

    params, paths = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run_id = json.loads((paths.trained("recpo") / TRAIN_SUMMARY).read_text())["mlflow_run_id"]
    before = MlflowClient(store).get_run(run_id).info
    assert before.end_time
    log_pyfunc(params, paths, "recpo")
    after = MlflowClient(store).get_run(run_id).info
    assert (after.status, after.end_time) == (before.status, before.end_time)


def test_a_retrained_model_is_logged_despite_catalogue_updates_for_the_last_one(trained, store, monkeypatch) -> None:  # noqa: F811
    import json

    from rrec.model.loading import TRAIN_SUMMARY
    from rrec.serve.recommend import SERVING_JSON, serving_dir
    from rrec.stages.train import log_trained_model

    params, paths = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    stale = serving_dir(paths, "recpo")
    stale.mkdir(parents=True, exist_ok=True)
    (stale / SERVING_JSON).write_text(json.dumps({"source": "an earlier training"}))
    summary = json.loads((paths.trained("recpo") / TRAIN_SUMMARY).read_text())
    try:
        log_trained_model(params, paths, "recpo", summary)  # `rrec catalogue ...`, then dvc exp run
    finally:
        import shutil

        shutil.rmtree(stale)
