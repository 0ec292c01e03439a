"""Serving: the Recommender API, the MLflow pyfunc model (in process and over HTTP),
catalogue updates without retraining, and the `rrec` CLI — on one tiny trained project."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from rrec.config import Params
from rrec.model.item_table import ItemTable, score
from rrec.model.loading import TRAIN_SUMMARY
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.serve import (
    Catalogue,
    Recommendation,
    Recommender,
    RequestError,
    add_or_replace_items,
    remove_items,
    serving_dir,
)
from rrec.serve.server import model_server
from tests.conftest import TINY_OVERRIDES, write_params

NOW = 1_700_000_000_000  # a fixed "now" (ms) keeps prompts, hence answers, reproducible
DAY = 86_400_000
FAST_TRAIN = {
    **TINY_OVERRIDES,
    "train.max_steps": 2,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "train.eval_max_users": 8,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for training and the pyfunc tests (a new sqlite store spends seconds
    on its migrations); the model is then logged into its training run, as in a project."""
    return f"sqlite:///{tmp_path_factory.mktemp('serve_mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def trained(
    tiny_project: tuple[Params, Paths], tmp_path_factory: pytest.TempPathFactory, store: str
) -> tuple[Params, Paths]:
    """A copy of the tiny project with a RecPO model trained for two steps."""
    from rrec.train.run import run_train

    _, src = tiny_project
    root = tmp_path_factory.mktemp("serve") / "project"
    shutil.copytree(src.root, root, ignore=shutil.ignore_patterns("mlflow", "checkpoints", "trained"))
    params = write_params(root, FAST_TRAIN)
    paths = Paths(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        run_train(params, paths, "recpo")
    return params, paths


@pytest.fixture(scope="module")
def base(trained: tuple[Params, Paths]) -> Recommender:
    params, paths = trained
    return Recommender.from_dir(params, paths, "recpo", device="cpu")


def fresh(rec: Recommender) -> Recommender:
    """The same model with its own copy of the table and catalogue (for tests that update them)."""
    return Recommender(
        rec.model, ItemTable(rec.table.embeddings.clone()), Catalogue(rec.catalogue.rows), rec.params,
        method=rec.method, reasoning=rec.reasoning, source=rec.source,
    )


@pytest.fixture(scope="module")
def histories(trained: tuple[Params, Paths]) -> list[list[int]]:
    _, paths = trained
    users = load_user_prompts(paths, "test")
    return [h for h in users.histories if len(h) >= 2][:4]


def _ids(rec: Recommendation) -> list[int]:
    return [i.item_id for i in rec.items]


def _unique_title_ids(rec: Recommender, n: int) -> list[int]:
    return [i for i in range(len(rec.catalogue)) if len(rec.catalogue.ids_of_title(rec.catalogue.title(i))) == 1][:n]


# ------------------------------------------------------------------ recommend


def test_recommend_returns_k_distinct_items_outside_the_history(base: Recommender, histories):
    out = base.recommend(histories, k=10, now_ms=NOW)
    assert len(out) == len(histories)
    for history, rec in zip(histories, out, strict=True):
        ids = _ids(rec)
        assert len(ids) == 10 and len(set(ids)) == 10
        assert not set(ids) & set(history)
        scores = [i.score for i in rec.items]
        assert scores == sorted(scores, reverse=True)
        for item in rec.items:
            assert item.title == base.catalogue.title(item.item_id)
            assert item.parent_asin == base.catalogue.parent_asin(item.item_id)
        assert 0 <= rec.reasoning_tokens <= base.params.evaluate.max_new_tokens


def test_user_state_is_the_one_a_second_encoding_would_give(base: Recommender, histories):
    """The state read in the generation pass equals encoding prompt + reasoning + <answer>
    from scratch, and the ranking is the full ranking of its scores with the history masked."""
    history = histories[0]
    (rec,) = base.recommend([history], k=5, now_ms=NOW)
    conv = base.conversation(base.parse_history(history, NOW), NOW)
    states, reasoning = base.user_states([conv])
    assert rec.reasoning == base.model.tokenizer.decode(reasoning[0][: rec.reasoning_tokens])
    prompt = base.model.user_prompt_ids([conv])[0]
    with torch.no_grad():
        state = base.model.encode([prompt + reasoning[0][: rec.reasoning_tokens] + [base.model.answer_token_id]])
    assert torch.allclose(states[0], state[0].float(), atol=1e-4)
    expected = score(state.float(), base.table.embeddings, base.model.tau)[0]
    expected[history] = float("-inf")
    top = expected.topk(5)
    assert _ids(rec) == top.indices.tolist()
    assert [i.score for i in rec.items] == pytest.approx(top.values.tolist(), abs=1e-3)


def test_history_as_titles_and_objects(base: Recommender):
    ids = _unique_title_ids(base, 3)
    by_id = base.recommend([ids], k=8, now_ms=NOW)[0]
    by_title = base.recommend([[{"title": base.catalogue.title(i).upper()} for i in ids]], k=8, now_ms=NOW)[0]
    by_asin = base.recommend([[{"parent_asin": base.catalogue.parent_asin(i)} for i in ids]], k=8, now_ms=NOW)[0]
    assert _ids(by_title) == _ids(by_id) == _ids(by_asin)
    assert [i.score for i in by_title.items] == [i.score for i in by_id.items]

    # ratings and timestamps reach the prompt; entries are put in time order
    entries = [
        {"item_id": ids[0], "rating": 5, "timestamp": NOW - DAY},
        {"item_id": ids[1], "rating": 2.0, "timestamp": NOW - 3 * DAY},
        ids[2],
    ]
    text = base.conversation(base.parse_history(entries, NOW), NOW)[0]["content"]
    lines = text.splitlines()[-3:]
    assert lines == [
        f"3d 0.0h ago: [{base.catalogue.title(ids[1])}] (2.0)",
        f"1d 0.0h ago: [{base.catalogue.title(ids[0])}] (5.0)",
        f"0d 0.0h ago: [{base.catalogue.title(ids[2])}] (unknown)",
    ]


def test_without_reasoning_the_state_is_read_at_answer_after_the_prompt(base: Recommender, histories):
    rec = Recommender(base.model, base.table, base.catalogue, base.params, method="contrastive", reasoning=False)
    (out,) = rec.recommend([histories[1]], k=4, now_ms=NOW)
    assert out.reasoning == "" and out.reasoning_tokens == 0
    conv = rec.conversation(rec.parse_history(histories[1], NOW), NOW)
    with torch.no_grad():
        state = rec.model.encode(rec.model.user_prompt_ids([conv], answer=True))
    expected = score(state, rec.table.embeddings, rec.model.tau)[0]
    expected[histories[1]] = float("-inf")
    assert _ids(out) == expected.topk(4).indices.tolist()


@pytest.mark.parametrize(
    ("history", "kwargs", "message"),
    [
        ([10**6], {}, "unknown item id 1000000"),
        ([], {}, "history is empty"),
        ("12,40", {}, "must be a list"),
        ([1, "two"], {}, r"history\[1\]: 'two' is neither an item id"),
        ([{"item": 3}], {}, r"unknown field\(s\) \['item'\]"),
        ([{"title": "No Such Game Anywhere"}], {}, "no item titled 'No Such Game Anywhere'"),
        ([{"parent_asin": "NOPE"}], {}, "unknown parent_asin 'NOPE'"),
        ([{"item_id": 1, "rating": 9}], {}, "rating must be a number from 0 to 5"),
        ([{"item_id": 1, "timestamp": 1_690_000_000}], {}, "looks like seconds"),
        ([{"item_id": 1, "timestamp": NOW + DAY}], {}, "later than now"),
        ([1, 2], {"k": 0}, "k must be a positive integer"),
    ],
)
def test_bad_requests_get_clear_errors(base: Recommender, history, kwargs, message):
    with pytest.raises(RequestError, match=message):
        base.recommend([history], now_ms=NOW, **kwargs)


def test_an_ambiguous_title_asks_for_the_id(base: Recommender):
    rec = fresh(base)
    (item,) = _unique_title_ids(rec, 1)
    twin = dict(rec.catalogue.rows[item], parent_asin="TWIN0000001")
    rec.catalogue.upsert([twin])
    with pytest.raises(RequestError, match=rf"names 2 items \(item ids \[{item}, {len(rec.catalogue) - 1}\]"):
        rec.recommend([[{"title": rec.catalogue.title(item)}]], now_ms=NOW)


# ------------------------------------------------------------------ catalogue


def _raw_meta(paths: Paths, params: Params, asin: str) -> dict:
    with gzip.open(paths.meta_file(params.data.category), "rt", encoding="utf-8") as f:
        for line in f:
            if asin in line:
                row = json.loads(line)
                if row.get("parent_asin") == asin:
                    return row
    raise AssertionError(f"{asin} not in the raw metadata")


def test_added_items_with_wrongly_typed_fields_or_nul_are_counted(base: Recommender, trained):
    from rrec.serve.catalogue_updates import add_or_replace_items

    params, paths = trained
    rec = fresh(base)
    meta = _raw_meta(paths, params, rec.catalogue.parent_asin(0))
    update = add_or_replace_items(rec, [
        json.dumps({**meta, "parent_asin": "TYPED00001", "features": "not a list", "rating_number": "1,234"}),
        json.dumps({**meta, "parent_asin": "TYPED00002", "title": "Widget\u0000model"}),
    ])
    assert len(update.added) == 2
    assert update.as_dict()["wrong_type"] == {"features": 1, "rating_number": 1}
    assert update.as_dict()["nul_characters"] == 1
    assert rec.catalogue.title(update.added[1]) == "Widget model"


def test_add_replace_remove_items(base: Recommender, trained, histories):
    params, paths = trained
    rec = fresh(base)
    n = len(rec.catalogue)
    history = histories[0]
    before = rec.recommend([history], k=5, now_ms=NOW)[0]
    popular = before.items[0].item_id
    meta = _raw_meta(paths, params, rec.catalogue.parent_asin(popular))

    # a new item whose text copies the top item: same row, so recommended at once, same score
    batch = [
        json.dumps({**meta, "parent_asin": "NEW0000001"}),
        "{not json",
        json.dumps({"parent_asin": "NEW0000002", "title": "x", "price": 1.0}),
    ]
    # 1 of 3 lines malformed is above data.window.max_malformed_share (0.05): nothing changes
    with pytest.raises(ValueError, match=r"1 of 3 lines are malformed.*max_malformed_share"):
        add_or_replace_items(rec, batch)
    assert len(rec.catalogue) == rec.n_items == n
    w = rec.params.data.window
    rec.params = rec.params.model_copy(update={"data": rec.params.data.model_copy(
        update={"window": w.model_copy(update={"max_malformed_share": 0.5})})})
    update = add_or_replace_items(rec, batch)
    assert update.added == [n] and update.replaced == [] and update.lines == 3
    assert update.dropped["malformed"] == 1 and update.dropped["short_title"] == 1
    assert len(rec.catalogue) == rec.n_items == n + 1
    assert torch.allclose(rec.table.embeddings[n], rec.table.embeddings[popular], atol=1e-5)
    after = rec.recommend([history], k=5, now_ms=NOW)[0]
    got = {i.item_id: i.score for i in after.items}
    assert n in got and got[n] == pytest.approx(got[popular], abs=1e-3)

    # replacing keeps the id, changes the row and the title
    old_row = rec.table.embeddings[popular].clone()
    update = add_or_replace_items(rec, [json.dumps({
        **meta, "title": "A Completely Different Game", "description": ["Nothing like before."]})])
    assert update.replaced == [popular] and update.added == []
    assert rec.catalogue.title(popular) == "A Completely Different Game"
    assert not torch.allclose(rec.table.embeddings[popular], old_row, atol=1e-4)

    # a removed item is never recommended, even when asking for every item
    update = remove_items(rec, [rec.catalogue.parent_asin(popular)])
    assert update.removed == [popular]
    everything = rec.recommend([history], k=rec.n_items, now_ms=NOW)[0]
    ids = _ids(everything)
    assert popular not in ids
    assert len(ids) == rec.n_items - 1 - len(set(history))
    with pytest.raises(KeyError, match="NOPE"):
        remove_items(rec, ["NOPE"])

    # updates persist, and from_dir serves them; a retrained model refuses stale updates
    out = serving_dir(paths, "recpo")
    try:
        rec.save(out)
        again = Recommender.from_dir(params, paths, "recpo", device="cpu")
        assert torch.equal(again.table.embeddings, rec.table.embeddings)
        assert again.catalogue.removed_mask()[popular] and again.catalogue.title(n) == meta["title"]
        summary = paths.trained("recpo") / TRAIN_SUMMARY
        original = summary.read_text()
        try:
            summary.write_text(original.replace('"method"', '"note": "retrained", "method"'))
            with pytest.raises(RuntimeError, match="retrained since"):
                Recommender.from_dir(params, paths, "recpo", device="cpu")
        finally:
            summary.write_text(original)
    finally:
        shutil.rmtree(out)


# ------------------------------------------------------------------------ CLI


def test_cli_recommend_and_catalogue(trained, base: Recommender, histories, tmp_path: Path):
    from rrec.cli import app

    params, paths = trained
    runner = CliRunner()
    common = ["--root", str(paths.root), "--now", str(NOW)]
    result = runner.invoke(app, ["recommend", "--history", ",".join(map(str, histories[0])), "--k", "3", "--json", *common])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    expected = base.recommend([histories[0]], k=3, now_ms=NOW)[0]
    assert [i["item_id"] for i in row["items"]] == _ids(expected)

    bad = runner.invoke(app, ["recommend", "--history", "1,99999", *common])
    assert bad.exit_code == 2 and "unknown item id 99999" in bad.output

    everything = ",".join(map(str, range(len(base.catalogue))))
    empty = runner.invoke(app, ["recommend", "--history", everything, "--k", "3", *common])
    assert empty.exit_code == 0, empty.output
    assert "note: 0 of the 3 items asked for" in empty.stdout

    asin = base.catalogue.parent_asin(3)
    out = tmp_path / "updates"
    removed = runner.invoke(app, ["catalogue", "remove", "--asin", asin, "--out", str(out), "--root", str(paths.root)])
    assert removed.exit_code == 0, removed.output
    report = json.loads(removed.stdout.strip().splitlines()[-1])
    assert report["removed"] == [3] and "--publish ALIAS" in report["note"]
    meta_file = tmp_path / "new.jsonl.gz"
    with gzip.open(meta_file, "wt") as f:
        f.write(json.dumps({**_raw_meta(paths, params, asin), "parent_asin": "CLI0000001"}) + "\n")
    added = runner.invoke(app, ["catalogue", "add", "--meta", str(meta_file), "--out", str(out), "--root", str(paths.root)])
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout.strip().splitlines()[-1])["added"] == [len(base.catalogue)]
    saved = Catalogue.read(out / "items.parquet")
    assert saved.removed_mask()[3] and saved.parent_asin(len(base.catalogue)) == "CLI0000001"


# ---------------------------------------------------------------------- pyfunc


def test_pyfunc_logged_and_reloaded_answers_like_the_api(
    trained, base: Recommender, histories, store: str, monkeypatch: pytest.MonkeyPatch
):
    import mlflow

    from rrec.serve.pyfunc import load_recommender, log_pyfunc

    params, paths = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    uri = log_pyfunc(params, paths, "recpo")
    summary = json.loads((paths.trained("recpo") / TRAIN_SUMMARY).read_text())
    assert mlflow.models.get_model_info(uri).run_id == summary["mlflow_run_id"]  # into the training run
    model = mlflow.pyfunc.load_model(uri)
    requests_ = [{"history": histories[0], "k": 5, "now": NOW}, {"history": histories[1], "k": 3, "now": NOW}]
    got = model.predict(requests_)
    expected = base.recommend([r["history"] for r in requests_], k=[5, 3], now_ms=NOW)
    assert [[i["item_id"] for i in g["items"]] for g in got] == [_ids(e) for e in expected]
    assert got[0]["reasoning"] == expected[0].reasoning
    assert [i["score"] for i in got[0]["items"]] == pytest.approx([i.score for i in expected[0].items], abs=1e-4)
    inner = load_recommender(uri)
    assert _ids(inner.recommend([histories[0]], k=5, now_ms=NOW)[0]) == _ids(expected[0])
    for bad, message in [
        ([{"history": [10**6]}], "unknown item id"),
        ([{"history": []}], "history is empty"),
        ([{"histroy": [1]}], "unknown field"),
        ("not a table", "must be a list of objects"),
    ]:
        with pytest.raises(MlflowException, match=message) as err:
            model.predict(bad)
        assert err.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.fixture
def served(
    trained, store: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """`mlflow models serve` of the registered champion, on a free 127.0.0.1 port."""
    from rrec import registry
    from rrec.serve.pyfunc import log_pyfunc

    params, paths = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    name = registry.model_name(params.data.category)
    uri = log_pyfunc(params, paths, "recpo", registered_model_name=name)
    registry.set_alias(name, registry.CHAMPION, uri.rsplit("/", 1)[1], root=paths.root)
    with model_server(f"models:/{name}@{registry.CHAMPION}", paths.root / "serve.log") as url:
        yield url


def test_served_model_answers_over_http(served: str, base: Recommender, histories):
    body = {"dataframe_records": [{"history": histories[0], "k": 4, "now": NOW}]}
    r = requests.post(f"{served}/invocations", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert [i["item_id"] for i in pred["items"]] == _ids(base.recommend([histories[0]], k=4, now_ms=NOW)[0])

    ids = _unique_title_ids(base, 2)
    titles = {"inputs": [{"history": [{"title": base.catalogue.title(i), "rating": 4} for i in ids], "k": 2}]}
    r = requests.post(f"{served}/invocations", json=titles, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["items"]) == 2

    for bad, message in [
        ({"dataframe_records": [{"history": [10**6]}]}, "unknown item id 1000000"),
        ({"dataframe_records": [{"history": []}]}, "history is empty"),
        ({"dataframe_records": [{"histroy": [1]}]}, "unknown field"),
        ({"dataframe_records": [{"history": [1], "k": -3}]}, "k must be a positive integer"),
        ({"nothing": 1}, "input fields"),
    ]:
        r = requests.post(f"{served}/invocations", json=bad, timeout=60)
        assert 400 <= r.status_code < 500, (bad, r.status_code, r.text)
        assert message in r.json()["message"]
    r = requests.post(f"{served}/invocations", data="{not json", headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500


def test_a_published_catalogue_change_reaches_the_served_model(
    trained, histories, store: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """`rrec catalogue remove --publish champion` registers the updated model as a new
    version and moves the alias; a server restarted on the alias never recommends the item."""
    from rrec import registry
    from rrec.cli import app
    from rrec.serve.pyfunc import log_pyfunc

    params, paths = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    name = registry.model_name(params.data.category)
    first = int(log_pyfunc(params, paths, "recpo", registered_model_name=name).rsplit("/", 1)[1])
    registry.set_alias(name, registry.CHAMPION, first, root=paths.root)
    served_uri = f"models:/{name}@{registry.CHAMPION}"
    body = {"dataframe_records": [{"history": histories[0], "k": 3, "now": NOW}]}

    def served_items(log_name: str) -> list[dict]:
        with model_server(served_uri, tmp_path / log_name) as url:
            r = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]["items"]

    before = served_items("before.log")
    top = before[0]
    result = CliRunner().invoke(app, [
        "catalogue", "remove", "--asin", top["parent_asin"], "--out", str(tmp_path / "updates"),
        "--publish", registry.CHAMPION, "--root", str(paths.root),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["published"] == f"models:/{name}/{first + 1}" and report["alias"] == registry.CHAMPION
    assert registry.champion_version(name, root=paths.root) == first + 1
    after = served_items("after.log")
    assert top["item_id"] not in [i["item_id"] for i in after]
    assert [i["item_id"] for i in after[:2]] == [i["item_id"] for i in before[1:3]]


def test_publishing_refuses_an_alias_that_serves_another_run(
    trained, base: Recommender, store: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    from mlflow import MlflowClient

    from rrec import registry
    from rrec.cli import app

    params, paths = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = MlflowClient(tracking_uri=store)
    name = registry.model_name(params.data.category)
    other_run = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, str(tmp_path), run_id=other_run).version
    client.set_registered_model_alias(name, "elsewhere", version)
    result = CliRunner().invoke(app, [
        "catalogue", "remove", "--asin", base.catalogue.parent_asin(5), "--out", str(tmp_path / "updates"),
        "--publish", "elsewhere", "--root", str(paths.root),
    ])
    assert result.exit_code == 2
    assert f"{name}@elsewhere is version {version}" in result.output and other_run in result.output
    assert client.get_model_version_by_alias(name, "elsewhere").version == version


def test_single_requests_on_the_aot_decoder_answer_like_the_api(trained, base: Recommender, histories, tmp_path):
    """`model.aot_single_requests`: the pyfunc model builds the ahead-of-time compiled
    decoder when it loads, and a request on its own gets the same answer from it."""
    from types import SimpleNamespace

    from rrec.serve.pyfunc import RecommenderModel, _artifacts

    params, paths = trained
    aot_params = params.model_copy(update={"model": params.model.model_copy(update={"aot_single_requests": True})})
    model = RecommenderModel()
    model.load_context(SimpleNamespace(artifacts=_artifacts(aot_params, paths, "recpo", None, tmp_path)))
    rec = model.recommender
    assert rec.model.aot_single_requests and rec.model._aot is not None  # built at load
    for history in histories[:2]:
        (got,) = model.predict(None, [{"history": history, "k": 5, "now": NOW}])
        (expected,) = base.recommend([history], k=5, now_ms=NOW)
        assert [i["item_id"] for i in got["items"]] == _ids(expected)
        assert got["reasoning"] == expected.reasoning
        assert [i["score"] for i in got["items"]] == pytest.approx([i.score for i in expected.items], abs=1e-4)
