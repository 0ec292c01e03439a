"""Learning curves of one method on the current project, for diagnosis: trains with
params.yaml plus overrides, set up exactly as the train stage sets it up
(`rrec.train.build`), and prints, every `every` steps, valid NDCG@10 and Hit@10 on
the whole valid split, the mean reasoning length, and how spread the item and user
states are (mean 1 - cosine over all pairs; near 0 means the states have collapsed
onto one direction). Nothing is written to the project.

    python benchmarks/learning_curves.py contrastive '{"steps": 300, "every": 50}'
    python benchmarks/learning_curves.py recpo '{"steps": 150, "every": 50}'   # from models/trained/contrastive
    python benchmarks/learning_curves.py recpo '{"steps": 150, "train.recpo.init": "backbone"}'
    ROOT=/path/to/other/project python benchmarks/learning_curves.py contrastive '{"model.tau": 0.05}'
    # control for RecPO: the contrastive model trained on as RecPO is (75 steps at its lr)
    python benchmarks/learning_curves.py contrastive '{"steps": 75, "every": 25, "from_trained": "contrastive", "train.lr": 1e-4}'

`--backbone` (`benchmarks/bench_project.py`): the project at `ROOT` (default: the
current folder) when its params name that backbone, else a project built with it by the
stage functions in `--build-into` or a temporary folder (with a two-step contrastive
model when RecPO starts from it). A `ROOT` set in the environment with another backbone
is refused:

    python benchmarks/learning_curves.py contrastive '{"steps": 20, "every": 10}' --backbone smollm2-135m

Keys other than steps, every and from_trained (start from models/trained/<method>, as
`train.recpo.init` does for RecPO) are dotted params overrides.
"""

import argparse
import atexit
import json
import os
import time
from pathlib import Path

import bench_project  # this folder's helper: --backbone, the project
import numpy as np
import torch

from rrec.config import load_params
from rrec.items import encode_items
from rrec.model.loading import start_from_trained
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.ranking import evaluate_policy
from rrec.train.build import build_training
from rrec.train.loop import epoch_batches

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("method", choices=["contrastive", "recpo"])
ap.add_argument("overrides", nargs="?", default="{}", help="JSON: steps, every, from_trained, dotted params")
bench_project.add_arguments(ap)
args = ap.parse_args()
method = args.method
ov = json.loads(args.overrides)
steps = int(ov.pop("steps", 200))
every = int(ov.pop("every", 50))
from_trained = ov.pop("from_trained", None)

workspace = bench_project.Workspace(args.build_into, "learning_curves_")
atexit.register(workspace.__exit__)
ROOT = Path(os.environ.get("ROOT", "."))
backbone, use_root = bench_project.choose(ROOT, args.backbone, explicit="ROOT" in os.environ)
if not use_root:
    _, built = bench_project.build_project(workspace.project, backbone)
    ROOT = built.root
    needs = [from_trained] if from_trained else []
    if method == "recpo" and load_params(ROOT / "params.yaml", ov).train.recpo.init == "contrastive":
        needs.append("contrastive")
    bench_project.ensure_trained(built, needs)
params = load_params(ROOT / "params.yaml", ov)
paths = Paths(ROOT)
training, train = build_training(params, paths, method)
rec = training.policy
if from_trained:
    start_from_trained(rec, paths.trained(from_trained))  # in place: the optimiser's tensors
valid = load_user_prompts(paths, "valid")
item_ids = training.ctx.item_prompt_ids
reasoning = training.reasoning
step_fn = training.step
tmp = workspace.scratch / "tables"


def ev(step):
    table = encode_items(
        rec, item_ids, tmp / f"t{step}", batch_size=64, chunk_size=4096, meta={"s": step}
    )
    m, d = evaluate_policy(
        rec,
        table,
        valid,
        reasoning=reasoning,
        ks=[10],
        max_new_tokens=params.evaluate.max_new_tokens,
        batch_size=64,
        progress=False,
    )
    rec.train()
    t = torch.nn.functional.normalize(table.embeddings, dim=-1)
    spread = float((1 - (t @ t.T)).mean())
    st = torch.nn.functional.normalize(d["states"], dim=-1)
    uspread = float((1 - st @ st.T).mean())
    print(
        json.dumps(
            {
                "step": step,
                "valid_ndcg10": round(m["ndcg@10"], 4),
                "hit10": round(m["hit@10"], 4),
                "len": round(m["reasoning_len"], 2),
                "item_spread": round(spread, 4),
                "user_spread": round(uspread, 4),
            }
        ),
        flush=True,
    )
    return table


table = ev(0)
if step_fn.table is not None:
    step_fn.table.copy_from(table)  # as the train stage: the table re-encoded at every evaluation
s = 0
ep = 0
t0 = time.time()
logs = []
while s < steps:
    for b in epoch_batches(len(train), params.train.batch_size, params.train.seed, ep):
        out = step_fn(b, s)
        s += 1
        logs.append(out)
        if s % 10 == 0:
            keys = [
                k
                for k in (
                    "loss",
                    "inbatch_reward",
                    "reward",
                    "reward_d",
                    "reasoning_len",
                    "adv_abs_mean",
                    "grad_norm",
                    "item_loss",
                    "token_loss",
                )
                if k in out
            ]
            print(
                s,
                f"{time.time() - t0:.0f}s",
                {k: round(float(np.mean([row[k] for row in logs[-10:]])), 4) for k in keys},
                flush=True,
            )
        if s % every == 0:
            tb = ev(s)
            if step_fn.table is not None:
                step_fn.table.copy_from(tb)
        if s >= steps:
            break
    ep += 1
