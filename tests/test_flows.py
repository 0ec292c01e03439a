"""The pipeline and retraining flows under Prefect's test harness.

DVC is replaced by a fake: a `dvc` script put first on PATH for the pipeline flow, and
a Python function standing in for `flows.retrain.run_dvc` for the retraining flow (it
writes the raw file and creates MLflow runs with chosen test NDCG@10 values).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from flows import pipeline, retrain
from flows.pipeline import StageFailed, pipeline_flow
from flows.retrain import retrain_flow
from rrec import registry
from rrec.config import DataParams, Params, load_params
from rrec.data.latest import latest_interaction_date
from rrec.paths import Paths

REPO = Path(__file__).resolve().parent.parent


def ms(day: str, hour: int = 12) -> int:
    d = dt.date.fromisoformat(day)
    return int(dt.datetime(d.year, d.month, d.day, hour, tzinfo=dt.UTC).timestamp() * 1000)


def write_gz(path: Path, lines: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------ latest interaction date


def _params(category: str, interactions: str) -> Params:
    return Params(data=DataParams(category=category, interactions=interactions))


def test_latest_date_rating_only_skips_malformed_lines(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    future = int((dt.datetime.now(dt.UTC) + dt.timedelta(days=400)).timestamp() * 1000)
    write_gz(paths.rating_only_file("Toys"), [
        "user_id,parent_asin,rating,timestamp",
        f"u1,B01,5.0,{ms('2022-03-01')}",
        f"u2,B02,4.0,{ms('2023-09-14', 23)}",
        "this line is not a CSV row",
        f"u3,B03,3.0,{ms('2024-05-01')},one field too many",
        "u4,B04,2.0",
        "u5,B05,1.0,not-a-number",
        f"u6,B06,1.0,{future}",  # cannot have happened yet
        f"u7,B07,1.0,-{ms('2025-01-01')}",
        f"u8,B08,4.0,{ms('2023-09-14', 1)}",
    ])
    assert latest_interaction_date(_params("Toys", "rating_only"), paths) == dt.date(2023, 9, 14)


def test_latest_date_reviews_skips_malformed_lines(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    good = {"rating": 5.0, "title": "fun", "text": "ok", "images": [], "asin": "B1",
            "parent_asin": "B1", "user_id": "u1", "helpful_vote": 0, "verified_purchase": True}
    write_gz(paths.reviews_file("Toys"), [
        json.dumps({**good, "timestamp": ms("2021-12-31", 23)}),
        '{"rating": 4.0, "timestamp": 17',  # truncated line
        json.dumps([1, 2, 3]),  # valid JSON, not a review
        json.dumps({**good, "timestamp": "yesterday"}),
        json.dumps({**good, "timestamp": ms("2022-01-02", 0)}),
        json.dumps({"rating": 1.0}),
        "",
    ])
    assert latest_interaction_date(_params("Toys", "reviews"), paths) == dt.date(2022, 1, 2)


def test_latest_date_errors_name_the_file(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Toys\.csv\.gz.*dvc repro download"):
        latest_interaction_date(_params("Toys", "rating_only"), paths)
    write_gz(paths.rating_only_file("Toys"), ["user_id,parent_asin,rating,timestamp", "u,B,5.0,x"])
    with pytest.raises(ValueError, match=r"Toys\.csv\.gz: no line with a valid `timestamp`"):
        latest_interaction_date(_params("Toys", "rating_only"), paths)


# ------------------------------------------------------------------ params.yaml edit

SMALL_PARAMS = """\
# The knobs. A comment that must survive.
seed: 0
data:
  source: sample   # inline comment
  category: Cat_A
  window:
    # the window's last day
    end: '2023-06-30'  # moved by retraining
    months: 12
    split: [0.8, 0.1, 0.1]
train:
  methods: [contrastive, recpo]
evaluate:
  ks: [5, 10, 20]
  max_users: null
"""


def test_dvc_exp_run_moves_the_window_keeping_comments_and_quotes(tmp_path: Path) -> None:
    """The retraining flow's `dvc exp run -S` argument, on a real DVC project: the date
    stays a quoted string (a bare one would reach DVC as a date), comments stay."""
    from dvc.repo import Repo

    root = tmp_path / "exp"
    root.mkdir()
    (root / "params.yaml").write_text(SMALL_PARAMS)
    (root / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python -c \"import yaml; print(yaml.safe_load(open('params.yaml'))"
        "['data']['window']['end'])\" > out.txt\n    params: [data.window.end]\n    outs: [out.txt]\n"
    )
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    Repo.init(str(root)).close()
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=root, check=True)
    arg = retrain.window_end_override("params.yaml", dt.date(2024, 2, 29))
    subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", arg], cwd=root, check=True,
                   capture_output=True)
    text = (root / "params.yaml").read_text()
    expected = SMALL_PARAMS.replace("'2023-06-30'", "'2024-02-29'")
    assert yaml.safe_load(text) == yaml.safe_load(expected)
    assert "    end: '2024-02-29'  # moved by retraining\n" in text
    assert [ln for ln in text.splitlines() if "#" in ln] == [ln for ln in expected.splitlines() if "#" in ln]
    assert (root / "out.txt").read_text().strip() == "2024-02-29"
    assert load_params(root / "params.yaml").data.window.end == dt.date(2024, 2, 29)


# ---------------------------------------------------------------- pipeline, fake dvc

FAKE_DVC = """\
#!{python}
import os, sys
from pathlib import Path
log = Path(os.environ["FAKE_DVC_LOG"])
with log.open("a") as fh:
    fh.write(" ".join(sys.argv[1:]) + "|" + os.environ.get("PREFECT_API_URL", "") + "\\n")
stage = sys.argv[-1]
if stage in os.environ.get("FAKE_DVC_SKIP", "").split(","):
    print(f"Stage '{{stage}}' didn't change, skipping")
    sys.exit(0)
print(f"Running stage '{{stage}}':")
for pct in (10, 50, 90):
    sys.stderr.write(f"{{stage}}: {{pct}}%\\r")
flaky = Path(os.environ["FAKE_DVC_LOG"] + ".flaky")
if stage == os.environ.get("FAKE_DVC_FLAKY") and not flaky.exists():
    flaky.touch()
    print("ConnectionError: remote hung up", file=sys.stderr)
    sys.exit(1)
if stage == os.environ.get("FAKE_DVC_FAIL"):
    for i in range(50):
        print(f"noise line {{i}}", file=sys.stderr)
    print("Traceback (most recent call last):", file=sys.stderr)
    print(f"ValueError: boom in {{stage}}", file=sys.stderr)
    print(f"ERROR: failed to reproduce '{{stage}}'", file=sys.stderr)
    sys.exit(255)
"""


PIPELINE_DVC_YAML = """\
stages:
  download:
    cmd: fetch
    outs: [data/raw]
  report:  # listed early on purpose: it still runs after the stages it depends on
    cmd: report
    deps: [models/trained/contrastive, models/trained/recpo]
    outs: [reports/comparison.md]
  window:
    cmd: window
    deps: [data/raw]
    outs: [data/processed]
  train:
    foreach: ${train.methods}
    do:
      cmd: train ${item}
      deps: [data/processed]
      outs:
        - models/trained/${item}
"""
PIPELINE_STAGES = ["download", "window", "train@contrastive", "train@recpo", "report"]


@pytest.fixture
def fake_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DVC project (foreach stage included) with a fake `dvc` first on PATH; returns its root."""
    from dvc.repo import Repo

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "dvc"
    script.write_text(FAKE_DVC.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DVC_LOG", str(tmp_path / "calls.log"))
    root = tmp_path / "project"
    root.mkdir()
    Repo.init(str(root), no_scm=True).close()
    (root / "dvc.yaml").write_text(PIPELINE_DVC_YAML)
    (root / "params.yaml").write_text("train:\n  methods: [contrastive, recpo]\n")
    return root


def calls(root: Path) -> list[tuple[str, str]]:
    log = root.parent / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [tuple(line.split("|", 1)) for line in lines]  # type: ignore[misc]


def test_dvc_stages_of_the_project() -> None:
    stages = pipeline.dvc_stages(REPO)
    methods = load_params(REPO / "params.yaml").train.methods
    assert stages[0] == "download" and stages[-1] == "report"
    for m in methods:
        assert stages.index("items") < stages.index(f"train@{m}") < stages.index(f"evaluate@{m}")


def test_dvc_stages_expand_foreach_and_respect_dependencies(fake_dvc: Path) -> None:
    assert pipeline.dvc_stages(fake_dvc) == PIPELINE_STAGES


def test_pipeline_runs_every_stage_in_order(
    prefect_api: None, fake_dvc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DVC_SKIP", "download,window")
    result = pipeline_flow(root=str(fake_dvc))
    assert result == {s: ("skipped" if s in ("download", "window") else "ran") for s in PIPELINE_STAGES}
    made = calls(fake_dvc)
    assert [c[0] for c in made] == [f"repro --single-item {s}" for s in PIPELINE_STAGES]


def test_pipeline_retries_download_and_stops_at_a_failing_stage(
    prefect_api: None, fake_dvc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DVC_FLAKY", "download")
    monkeypatch.setenv("FAKE_DVC_FAIL", "train@recpo")
    state = pipeline_flow(root=str(fake_dvc), download_retries=1, retry_delay_s=0, return_state=True)
    assert state.is_failed()
    assert [c[0].split()[-1] for c in calls(fake_dvc)] == [
        "download", "download", "window", "train@contrastive", "train@recpo"]
    with pytest.raises(StageFailed) as err:
        state.result()
    message = str(err.value)
    assert "`dvc repro --single-item train@recpo` exited with status 255" in message
    assert "ValueError: boom in train@recpo" in message
    assert "ERROR: failed to reproduce 'train@recpo'" in message
    assert "noise line 49" in message and "noise line 0\n" not in message  # only the tail


def test_pipeline_does_not_retry_other_stages(
    prefect_api: None, fake_dvc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DVC_FLAKY", "window")
    with pytest.raises(StageFailed, match="ConnectionError: remote hung up"):
        pipeline_flow(stages=["window", "download"], root=str(fake_dvc), retry_delay_s=0)
    assert [c[0] for c in calls(fake_dvc)] == [
        "repro --single-item download", "repro --single-item window"]


def test_pipeline_selects_a_foreach_group(prefect_api: None, fake_dvc: Path) -> None:
    assert list(pipeline_flow(stages=["report", "train"], root=str(fake_dvc))) == [
        "train@contrastive", "train@recpo", "report"]


def test_pipeline_rejects_unknown_stages(prefect_api: None, fake_dvc: Path) -> None:
    with pytest.raises(ValueError, match=r"no stage\(s\) \['trian'\]"):
        pipeline_flow(stages=["trian"], root=str(fake_dvc))
    assert calls(fake_dvc) == []


def test_run_streaming_throttles_progress_redraws() -> None:
    code = (
        "import sys\n"
        "print('first'); sys.stdout.flush()\n"
        "for i in range(5): sys.stderr.write(f'bar {i}\\r'); sys.stderr.flush()\n"
        "sys.stderr.write('bar done\\n'); print('last'); sys.exit(3)\n"
    )
    seen: list[tuple[str, str]] = []
    result = pipeline.run_streaming([sys.executable, "-c", code], Path.cwd(),
                                    lambda s, t: seen.append((s, t)))
    assert result.returncode == 3
    assert result.stdout_tail == ["first", "last"]
    assert result.stderr_tail == ["bar done"]  # redraws are not part of the tail
    assert ("stderr", "bar 0") in seen and ("stderr", "bar 1") not in seen
    assert ("stderr", "bar done") in seen


# ---------------------------------------------------------- retraining, fake pipeline


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


class FakePipeline:
    """Stands in for `dvc`: download writes a raw file whose newest interaction is
    `latest`; `dvc exp run -S <params>:data.window.end='<date>'` sets the date in
    params.yaml (as DVC does, the rest of the file untouched) and "trains" every method
    (an MLflow run with test NDCG@10 from `ndcg10` and a tiny adapter under the model
    artifact path), writing their train summaries; with `register_in_evaluate`, the
    run's model is registered as the evaluate stage would."""

    def __init__(self, root: Path, exp_id: str) -> None:
        self.root, self.exp_id = root, exp_id
        self.latest = "2023-06-30"
        self.ndcg10 = {"contrastive": 0.0, "recpo": 0.0}
        self.register_in_evaluate = False
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str], root: Path) -> None:
        assert Path(root) == self.root
        self.calls.append(list(args))
        params = load_params(root / "params.yaml")
        paths = Paths(root)
        if args[-1] == "download":
            write_gz(paths.rating_only_file(params.data.category), [
                "user_id,parent_asin,rating,timestamp",
                f"u1,B1,5.0,{ms('2022-01-05')}",
                f"u2,B2,4.0,{ms(self.latest, 22)}",
                "broken,line",
            ])
            return
        assert list(args[:3]) == ["exp", "run", "-S"] and len(args) == 4, args
        key, value = args[3].split("=", 1)
        assert key == "params.yaml:data.window.end" and value[0] == value[-1] == "'", args
        text = (root / "params.yaml").read_text()
        (root / "params.yaml").write_text(text.replace(f"'{params.data.window.end}'", value))
        params = load_params(root / "params.yaml")
        for method in params.train.methods:
            self.train(params, paths, method)

    def train(self, params: Params, paths: Paths, method: str) -> None:
        adapter = self.root / "adapter" / method
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "adapter_config.json").write_text(json.dumps({"method": method}))
        with mlflow.start_run(experiment_id=self.exp_id, tags={"rrec.method": method}) as run:
            mlflow.log_param("data.window.end", str(params.data.window.end))
            mlflow.log_artifacts(str(adapter), artifact_path=retrain.MODEL_ARTIFACT)
            mlflow.log_metric("test_ndcg_at_10", self.ndcg10[method])
        summary: dict[str, object] = {"method": method, "mlflow_run_id": run.info.run_id}
        if self.register_in_evaluate:
            registry.register_run_model(run.info.run_id, retrain.MODEL_ARTIFACT, params.data.category)
        paths.trained(method).mkdir(parents=True, exist_ok=True)
        (paths.trained(method) / "train_summary.json").write_text(json.dumps(summary))


@pytest.fixture
def fake_pipeline(
    prefect_api: None, empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> FakePipeline:
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_store, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    exp_id = mlflow.create_experiment("rrec", artifact_location=(tmp_path / "artifacts").as_uri())
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(SMALL_PARAMS)
    fake = FakePipeline(root, exp_id)
    monkeypatch.setattr(retrain, "run_dvc", fake)
    return fake


def test_retrain_promotes_a_better_model(fake_pipeline: FakePipeline) -> None:
    fake, root = fake_pipeline, fake_pipeline.root
    fake.latest, fake.ndcg10 = "2023-09-14", {"contrastive": 0.10, "recpo": 0.08}
    first = retrain_flow(root=str(root))
    assert fake.calls == [["repro", "--force", "download"],
                          ["exp", "run", "-S", "params.yaml:data.window.end='2023-09-14'"]]
    assert first["version"] == 1 and first["promoted"] is True
    assert first["method"] == "contrastive"  # the better of the two trained methods
    assert first["challenger_ndcg10"] == pytest.approx(0.10)
    assert first["champion_ndcg10"] is None
    assert first["window_end"] == "2023-09-14"
    # the window moved before the pipeline ran, and nothing else in the file changed
    assert (root / "params.yaml").read_text() == SMALL_PARAMS.replace("2023-06-30", "2023-09-14")
    client = MlflowClient()
    assert client.get_run(first["run_id"]).data.params["data.window.end"] == "2023-09-14"
    v1 = client.get_model_version("rrec-Cat_A", "1")
    assert v1.run_id == first["run_id"] and v1.tags["rrec.method"] == "contrastive"
    out = Path(mlflow.artifacts.download_artifacts("models:/rrec-Cat_A@champion",
                                                   dst_path=str(root / "dl")))
    assert json.loads((out / "adapter_config.json").read_text()) == {"method": "contrastive"}

    fake.latest, fake.ndcg10 = "2023-09-21", {"contrastive": 0.12, "recpo": 0.30}
    second = retrain_flow(root=str(root), refresh_data=False)
    assert fake.calls[2:] == [["repro", "download"],
                              ["exp", "run", "-S", "params.yaml:data.window.end='2023-09-21'"]]
    assert second["version"] == 2 and second["promoted"] is True and second["method"] == "recpo"
    assert second["champion_ndcg10"] == pytest.approx(0.10)
    assert second["challenger_ndcg10"] == pytest.approx(0.30)
    assert client.get_registered_model("rrec-Cat_A").aliases == {"champion": 2, "challenger": 2}
    assert client.get_model_version("rrec-Cat_A", "1").tags[registry.REPLACED_BY_TAG] == "2"
    assert client.get_model_version("rrec-Cat_A", "2").run_id == second["run_id"]


def test_retrain_keeps_the_champion_when_the_challenger_is_worse(
    fake_pipeline: FakePipeline,
) -> None:
    fake, root = fake_pipeline, fake_pipeline.root
    fake.register_in_evaluate = True  # the evaluate stage registered: the flow uses its version
    fake.ndcg10 = {"contrastive": 0.20, "recpo": 0.05}
    assert retrain_flow(root=str(root))["promoted"] is True

    fake.ndcg10 = {"contrastive": 0.15, "recpo": 0.12}
    worse = retrain_flow(root=str(root))
    assert worse == {
        "version": 3, "promoted": False, "challenger_ndcg10": pytest.approx(0.15),
        "champion_ndcg10": pytest.approx(0.20), "champion_ndcg10_recorded": pytest.approx(0.20),
        "test_split": None, "method": "contrastive", "run_id": worse["run_id"], "window_end": "2023-06-30",
    }
    assert (root / "params.yaml").read_text() == SMALL_PARAMS  # the date did not move

    aliases = MlflowClient().get_registered_model("rrec-Cat_A").aliases
    assert aliases == {"champion": 1, "challenger": 3}
    assert registry.champion_metric("rrec-Cat_A") == pytest.approx(0.20)


def test_retrain_without_changes_keeps_everything(
    fake_pipeline: FakePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_pipeline
    fake.ndcg10 = {"contrastive": 0.2, "recpo": 0.1}
    first = retrain_flow(root=str(fake.root))

    def dvc_skips_everything(args: Sequence[str], root: Path) -> None:
        fake.calls.append(list(args))

    monkeypatch.setattr(retrain, "run_dvc", dvc_skips_everything)
    again = retrain_flow(root=str(fake.root))
    assert again["version"] == first["version"] == 1  # the same run is not registered twice
    assert again["promoted"] is False
    assert MlflowClient().get_registered_model("rrec-Cat_A").aliases == {
        "champion": 1, "challenger": 1}


def test_retrain_fails_clearly_without_a_train_summary(
    fake_pipeline: FakePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(args: Sequence[str], root: Path) -> None:
        if args[-1] == "download":
            fake_pipeline(args, root)

    monkeypatch.setattr(retrain, "run_dvc", no_training)
    state = retrain_flow(root=str(fake_pipeline.root), return_state=True)
    assert state.is_failed()
    with pytest.raises(FileNotFoundError, match=r"contrastive/train_summary\.json: not found"):
        state.result()


def test_serve_entrypoint_builds_the_scheduled_deployment() -> None:
    from prefect.schedules import Cron

    deployment = retrain_flow.to_deployment(name=retrain.DEPLOYMENT,
                                            schedule=Cron(retrain.CRON, timezone="UTC"))
    assert deployment.name == "rrec-retrain"
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "UTC"


def test_prefect_yaml_declares_the_weekly_deployment() -> None:
    import yaml

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert dep["name"] == retrain.DEPLOYMENT
    assert dep["entrypoint"] == "flows/retrain.py:retrain_flow"
    assert dep["work_pool"]["name"] == "rrec-local"
    assert dep["schedules"] == [{"cron": retrain.CRON, "timezone": "UTC", "active": True}]
    path, func = dep["entrypoint"].split(":")
    assert (REPO / path).exists() and getattr(retrain, func) is retrain_flow
