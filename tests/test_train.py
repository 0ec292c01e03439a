import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rrec.config import LoraParams
from rrec.metrics import hit_from_ranks, ndcg_from_ranks
from rrec.model.loading import TRAIN_SUMMARY
from rrec.model.lora import apply_lora
from rrec.model.two_headed import RecModel
from rrec.stages.evaluate import RANKS_CSV, evaluate_stage, read_ranks
from rrec.train.objectives import contrastive_loss, inbatch_logprob, item_loss, token_loss
from tests.tiny import conversations, tiny_recmodel

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "train_script.py"


def _lora_model() -> RecModel:
    base = tiny_recmodel()
    lm = apply_lora(base.lm, LoraParams(enabled=True, r=4, alpha=8.0, dropout=0.0))
    return RecModel(lm, base.tokenizer, tau=0.1)


def _grads(model: RecModel) -> tuple[float, int]:
    lora = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    frozen = [p.grad for n, p in model.named_parameters() if "lora_" not in n and p.grad is not None]
    return sum(float(g.abs().sum()) for g in lora if g is not None), len(frozen)


def test_lora_gradients_flow_from_the_contrastive_loss():
    model = _lora_model()
    users = model.encode(model.user_prompt_ids(conversations(4, seed=1), answer=True))
    items = model.encode(model.item_prompt_ids(conversations(3, seed=2)))
    loss = contrastive_loss(users, items, torch.tensor([0, 1, 2, 0]), 0.1)
    loss.backward()
    lora_grad, frozen_with_grad = _grads(model)
    assert lora_grad > 0 and frozen_with_grad == 0


def test_lora_gradients_flow_from_both_recpo_terms():
    model = _lora_model()
    seqs = model.user_prompt_ids(conversations(2, seed=3), answer=True)
    ids, mask = model.pad(seqs, padding_side="left")
    # token term alone
    logits = model(ids, mask, output="lm").logits[:, -4:-1]
    logp = torch.log_softmax(logits.float(), -1).gather(2, ids[:, -3:].unsqueeze(2)).squeeze(2)
    loss, _ = token_loss(logp, logp.detach() - 0.1, torch.tensor([1.0, -0.5]), torch.ones_like(logp), 0.2, 0.28)
    loss.backward()
    assert _grads(model)[0] > 0
    model.zero_grad()
    # item term alone
    users = model(ids, mask)
    items = model.encode(model.item_prompt_ids(conversations(2, seed=4)))
    idx = torch.tensor([0, 1])
    old = inbatch_logprob(users.detach(), items.detach(), idx, 0.1)
    loss, _ = item_loss(users, items, idx, torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), old, 0.1, 0.2, 0.28)
    loss.backward()
    lora_grad, frozen_with_grad = _grads(model)
    assert lora_grad > 0 and frozen_with_grad == 0


def _run(root: Path, method: str, *extra: str, launcher: list[str] | None = None, wait: bool = True):
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), str(root), method, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    if wait:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        return json.loads((root / f"summary_{method}.json").read_text())
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _copy(project, name: str, tmp_path: Path, *, lora: bool) -> Path:
    """A copy of the project without training outputs, training LoRA or all weights."""
    import shutil

    import yaml

    _, paths = project
    dst = tmp_path / name
    shutil.copytree(paths.root, dst, ignore=shutil.ignore_patterns("mlflow", "checkpoints", "trained", "reports"))
    tree = yaml.safe_load((dst / "params.yaml").read_text())
    tree["model"]["lora"]["enabled"] = lora
    (dst / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return dst


# each method once with LoRA and once with all weights trained, across the two tests below
@pytest.mark.parametrize(("method", "lora"), [("contrastive", False), ("recpo", True)])
def test_sigkill_and_resume_gives_the_same_result(tiny_project, tmp_path, method, lora):
    straight = _copy(tiny_project, "straight", tmp_path, lora=lora)
    killed = _copy(tiny_project, "killed", tmp_path, lora=lora)
    expected = _run(straight, method)

    proc = _run(killed, method, "--hang-after", "3", wait=False)
    deadline = time.monotonic() + 600
    while not (killed / "hanging").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # killed after step 3: the newest checkpoint is step 2, mid-epoch
    ckpts = sorted(p.name for p in (killed / "checkpoints" / method).glob("*/step-*"))
    assert ckpts == ["step-0000002"], ckpts
    assert not (killed / "models" / "trained" / method).exists()

    resumed = _run(killed, method)
    assert resumed["steps"] == expected["steps"] == 6
    assert resumed["best_step"] == expected["best_step"]
    for k, v in expected["best_valid"].items():
        assert resumed["best_valid"][k] == pytest.approx(v, abs=1e-6), k
    a = (straight / "models" / "trained" / method / "item_table" / "table.safetensors").read_bytes()
    b = (killed / "models" / "trained" / method / "item_table" / "table.safetensors").read_bytes()
    from safetensors.torch import load

    torch.testing.assert_close(load(a)["embeddings"], load(b)["embeddings"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "lora"), [("contrastive", True), ("recpo", False)])
def test_two_process_training_on_cpu(tiny_project, tmp_path, method, lora):
    root = _copy(tiny_project, "ddp", tmp_path, lora=lora)
    # torchrun, not `accelerate launch --cpu`: the latter needs mpirun for several CPU processes
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    summary = _run(root, method, launcher=launcher)
    assert summary["world_size"] == 2
    assert summary["steps"] == 6
    out = root / "models" / "trained" / method
    assert (out / "adapter" / ("adapter_config.json" if lora else "config.json")).exists()
    assert json.loads((out / TRAIN_SUMMARY).read_text())["method"] == method


def test_train_then_evaluate_writes_reports(project_copy):
    params, paths = project_copy
    from rrec.stages.train import train_stage

    summary = train_stage(params, paths, "contrastive")
    assert summary["steps"] == 6 and summary["best_step"] in (3, 6)
    # where the run's time went, in its MLflow run
    from mlflow import MlflowClient

    from rrec import tracking

    logged = MlflowClient(tracking.configure(paths.root)).get_run(summary["mlflow_run_id"]).data.metrics
    split = {k: v for k, v in logged.items() if k.startswith("time_s/")}
    assert set(split) == {f"time_s/{p}" for p in (
        "training_steps", "evaluations", "evaluations_item_table", "evaluations_valid_users",
        "evaluations_train_reward_probe", "evaluations_reasoning_samples", "logging",
        "best_model_saves", "checkpoints")}
    assert split["time_s/evaluations"] >= split["time_s/evaluations_item_table"] > 0
    report = evaluate_stage(params, paths, "contrastive")
    test = report["methods"]["contrastive"]["test"]
    assert set(test) >= {"hit@5", "ndcg@5", "hit@10", "ndcg@10", "hit@20", "ndcg@20"}
    assert 0 <= test["ndcg@10"] <= test["hit@10"] <= test["hit@20"] <= 1
    assert {"popularity", "random"} <= set(report["methods"])
    out = paths.eval_report("contrastive")
    assert json.loads((out / "metrics.json").read_text()) == {k: v for k, v in report.items() if k != "registered"}
    assert report["registered"] == {"model": "rrec-Video_Games", "version": 1, "champion": True}
    lines = (out / "metrics_by_k.csv").read_text().splitlines()
    assert lines[0] == "method,split,k,hit,ndcg" and len(lines) == 1 + 3 * 2 * 3
    curves = (out / "train_curves.csv").read_text().splitlines()
    assert curves[0].startswith("step,") and len(curves) == 7
    # the starting weights are a point of the validation curve, with the fused reward on
    # valid and on the fixed train probe, comparable across steps
    evals = list(csv.DictReader((out / "valid_curves.csv").open()))
    assert [int(e["step"]) for e in evals] == [0, 3, 6] and summary["best_step"] != 0
    for e in evals:
        assert 0 < float(e["reward"]) <= 1 and 0 < float(e["train_reward"]) <= 1
    # every example's rank, in the order and number the metrics were computed on
    ranks = read_ranks(out / RANKS_CSV)
    for split in ("valid", "test"):
        r = torch.tensor(list(ranks[split].values()))
        m = report["methods"]["contrastive"][split]
        assert len(r) == m["n"] and r.min() >= 1
        assert float(ndcg_from_ranks(r, 10).mean()) == pytest.approx(m["ndcg@10"])
        assert float(hit_from_ranks(r, 20).mean()) == pytest.approx(m["hit@20"])


@pytest.mark.parametrize("lora", [False, True])
def test_recpo_starts_from_the_trained_contrastive_weights(tmp_path, lora):
    """train.recpo.init: contrastive loads the contrastive run's weights (full or LoRA)
    into the fresh policy; a missing run is a clear error naming the stage to run."""
    from rrec.model.loading import ADAPTER_DIR, start_from_trained
    from rrec.model.lora import save_adapter

    def policy() -> RecModel:
        base = tiny_recmodel()
        if not lora:
            return base
        lm = apply_lora(base.lm, LoraParams(enabled=True, r=4, alpha=8.0, dropout=0.0))
        return RecModel(lm, base.tokenizer, tau=0.1)

    trained = policy()
    with torch.no_grad():
        for name, p in trained.lm.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * (1 + len(name) % 3))
    save_adapter(trained.lm, tmp_path / "contrastive" / ADAPTER_DIR)
    fresh = policy()
    before = {n: p.clone() for n, p in fresh.lm.named_parameters() if p.requires_grad}
    start_from_trained(fresh, tmp_path / "contrastive")
    got = dict(fresh.lm.named_parameters())
    want = dict(trained.lm.named_parameters())
    assert before and all(torch.equal(got[n], want[n]) and not torch.equal(got[n], before[n]) for n in before)
    with pytest.raises(FileNotFoundError, match="train@contrastive"):
        start_from_trained(policy(), tmp_path / "nothing")
