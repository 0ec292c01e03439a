from pathlib import Path

import pytest
import yaml

from rrec.config import ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def _committed() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_match_schema_defaults():
    # params.yaml is the embedded default: every key it sets equals the schema default,
    # so the schema and the file cannot drift apart silently.
    assert load_params(ROOT / "params.yaml") == Params()


def test_unknown_key_is_named(tmp_path):
    tree = _committed()
    tree["data"]["window"]["min_itmes"] = 5
    with pytest.raises(ConfigError, match=r"data\.window\.min_itmes: unknown key"):
        load_params(_write(tmp_path, tree))


def test_wrong_type_is_named(tmp_path):
    tree = _committed()
    tree["train"]["batch_size"] = "lots"
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_params(_write(tmp_path, tree))


def test_split_must_sum_to_one(tmp_path):
    tree = _committed()
    tree["data"]["window"]["split"] = [0.8, 0.1, 0.05]
    with pytest.raises(ConfigError, match=r"data\.window\.split: .*sum to 1"):
        load_params(_write(tmp_path, tree))


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("model.tau", 0),
        ("train.rollout.temperature", -1.0),
        ("data.source", "kaggle"),
        ("data.category", "Video Games; rm -rf"),
        ("model.tiny.num_heads", 3),
        ("evaluate.ks", []),
    ],
)
def test_impossible_values_are_named(tmp_path, dotted, value):
    tree = _committed()
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, tree))
    assert ".".join(parents) in str(err.value)


def test_overrides_use_dotted_keys(tmp_path):
    p = _write(tmp_path, _committed())
    params = load_params(p, overrides={"train.recpo.beta": 1.0, "train.methods": ["recpo"]})
    assert params.train.recpo.beta == 1.0
    assert params.train.methods == ["recpo"]
    with pytest.raises(ConfigError, match="train.recpo.bta"):
        load_params(p, overrides={"train.recpo.bta": 1.0})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_flat_view_has_dotted_keys():
    flat = Params().flat()
    assert flat["train.recpo.beta"] == 0.05
    assert flat["data.window.split"] == [0.8, 0.1, 0.1]


@pytest.mark.parametrize(
    ("max_steps", "recpo_cap", "contrastive", "recpo"),
    [(300, 60, 300, 60), (6, 60, 6, 6), (None, 60, None, 60), (None, None, None, None), (40, None, 40, 40)],
)
def test_recpo_step_cap(max_steps, recpo_cap, contrastive, recpo):
    train = Params.model_validate({"train": {"max_steps": max_steps, "recpo": {"max_steps": recpo_cap}}}).train
    assert train.steps_for("contrastive") == contrastive
    assert train.steps_for("recpo") == recpo


@pytest.mark.parametrize(("recpo_lr", "expected"), [(None, 3e-4), (1e-4, 1e-4)])
def test_recpo_learning_rate_defaults_to_the_shared_one(recpo_lr, expected):
    train = Params.model_validate({"train": {"lr": 3e-4, "recpo": {"lr": recpo_lr}}}).train
    assert train.lr_for("contrastive") == 3e-4
    assert train.lr_for("recpo") == expected


def test_training_reruns_when_any_model_setting_but_the_inference_ones_changes():
    from rrec.config import ModelParams

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]
    listed = {p.split(".", 1)[1] for p in stage["params"] if p.startswith("model.")}
    assert "model" not in stage["params"]
    assert listed == set(ModelParams.model_fields) - {"compile", "aot_single_requests"}


def _bare_date_params(tmp_path: Path) -> Path:
    text = (ROOT / "params.yaml").read_text()
    assert text.count("end: '2023-06-30'") == 1
    p = tmp_path / "params.yaml"
    p.write_text(text.replace("end: '2023-06-30'", "end: 2023-06-30"))
    return p


def test_a_bare_date_is_refused_with_the_fix_first(tmp_path):
    p = _bare_date_params(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_params(p)
    assert str(info.value).startswith(f"{p}: quote the date (end: '2023-06-30'): data.window.end is")
    assert "Unsupported value of type 'date'" in str(info.value)


def test_the_params_check_names_what_dvc_would_fail_on(tmp_path):
    import os
    import subprocess
    import sys

    p = _bare_date_params(tmp_path)
    check = subprocess.run([sys.executable, "-m", "rrec.config", str(p)], capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 2
    assert check.stderr.splitlines()[0].startswith(f"error: {p}: quote the date (end: '2023-06-30')")
    # what the message says of DVC: it cannot read the file
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: echo hi > out.txt\n    params: [data.window.end]\n    outs: [out.txt]\n")
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True, timeout=120)
    repro = subprocess.run([dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert repro.returncode != 0
    assert "Unsupported value of type 'date'" in repro.stdout + repro.stderr
    ok = subprocess.run([sys.executable, "-m", "rrec.config", str(ROOT / "params.yaml")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("params.yaml: valid")
