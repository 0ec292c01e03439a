"""Quality over seeds: train and evaluate the LLM methods with several training seeds,
on the full valid and test splits, and print one table (mean ± standard deviation over
the seeds, with n) beside the reference rows (popularity, random) and, when present,
the classic baselines of `reports/eval/baselines.json`.

Every seed runs in a scratch project holding a copy of this project's processed data,
prompts, backbone and item table, so the pipeline's own outputs are untouched (copies,
not links: MLflow refuses to log a model whose files resolve outside the project):

    python benchmarks/quality.py                      # seeds 0 1 2, params.yaml as it is
    python benchmarks/quality.py --seeds 0 1 -S train.recpo.max_steps=30

With `--workdir DIR` the per-seed projects are kept in DIR/seed-N, and a method whose
params are unchanged since its last run there is not trained again: comparing RecPO
settings then retrains only RecPO, from the same contrastive models. Contrastive reads
no `train.recpo`, `train.rollout` or `evaluate.max_new_tokens`, so changing them keeps it.
The projects hold a copy of the data and models as they were: after `dvc repro` changes
them, start a new DIR.

Below the table it prints the paired comparison of each LLM method with the first one
(by default RecPO − contrastive): the difference of per-example NDCG@10 on the very same
examples, averaged over the seeds, with a 95 % bootstrap interval over examples (the
same resampled examples for every seed) and the number of seeds where the method is ahead.

Run `dvc repro items` (or the whole pipeline) first, or name `--backbone`
(`benchmarks/bench_project.py`): the project at `--root` (default: the current folder)
when its params name that backbone, else a project built with it by the stage functions
(sample data .. item table) in `--build-into` or a temporary folder; a `--root` named on
the command line with another backbone is refused.

    python benchmarks/quality.py --backbone smollm2-135m --seeds 0 -S train.max_steps=20
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from rrec.config import load_params
from rrec.metrics import paired_difference
from rrec.paths import Paths
from rrec.stages.evaluate import RANKS_CSV, evaluate_stage, read_ranks
from rrec.train.run import run_train

SHARED = ("data/processed", "data/prompts", "models/backbone", "models/item_table", "dvc.lock")
COLUMNS = ("ndcg@10", "hit@10", "ndcg@20", "hit@20")
# params that change neither what a method trains nor its evaluation, so changing them
# keeps its earlier result in --workdir (the reward probe only adds points to the curves)
UNREAD = {
    "contrastive": (("train", "recpo"), ("train", "rollout"), ("evaluate", "max_new_tokens"),
                    ("train", "reward_probe_users")),
    "recpo": (("train", "reward_probe_users"),),
}


def print_paired(ranks_a: dict[str, list[dict[int, int]]], ranks_b: dict[str, list[dict[int, int]]]) -> dict[str, dict]:
    """Print B − A in NDCG@10 per split as a table (`ranks_*[split]`: one {example: rank}
    per seed, the same seeds in both) and return the figures by split."""
    print("| split | n | difference | 95 % interval | seeds ahead |")
    print("|---|---|---|---|---|")
    out = {}
    for split in ("valid", "test"):
        diff, (low, high), ahead, n = paired_difference(ranks_a[split], ranks_b[split])
        out[split] = {"difference": diff, "low": low, "high": high, "ahead": ahead, "n": n}
        print(f"| {split} | {n} | {diff:+.4f} | {low:+.4f} … {high:+.4f} | {ahead} of {len(ranks_a[split])} |")
    return out


def _scratch(root: Path, into: Path) -> Paths:
    for rel in SHARED:
        src = root / rel
        if src.is_dir():
            shutil.copytree(src, into / rel)
        elif src.exists():
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into / rel)
    return Paths(into)


def _parse_overrides(items: list[str]) -> dict[str, object]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def _method_key(params_json: dict, method: str) -> str:
    key = json.loads(json.dumps(params_json))
    for section, name in UNREAD.get(method, ()):
        key[section].pop(name)
    return json.dumps(key, sort_keys=True)


def _train_and_evaluate(params, paths: Paths, methods: list[str]) -> tuple[dict, dict]:
    """Each method's evaluation (plus the reference rows) and per-example ranks
    ({method: {split: {example_id: rank}}}), reusing a kept result whose params key
    matches (see --workdir)."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    ranks: dict[str, dict[str, dict]] = {}
    for method in methods:
        kept = paths.root / f"quality-{method}.json"
        key = _method_key(params.model_dump(mode="json"), method)
        old = json.loads(kept.read_text()) if kept.exists() else {}
        if old.get("key") == key and "ranks" in old:
            print(f"{method}: unchanged params, its kept result is reused", flush=True)
        else:
            if old.get("key") == key:
                print(f"{method}: unchanged params, its kept model is evaluated again", flush=True)
            else:
                run_train(params, paths, method)
            evaluated = evaluate_stage(params, paths, method, register=False)["methods"]
            old = {"key": key, "results": evaluated, "ranks": read_ranks(paths.eval_report(method) / RANKS_CSV)}
            kept.write_text(json.dumps(old))
        results.update(old["results"])
        ranks[method] = old["ranks"]  # example ids as JSON keys; main() reads them back as ints
    return results, ranks


def _one_seed(
    root: Path, seed: int, methods: list[str], overrides: list[str], out: Path, workdir: Path | None
) -> None:
    params = load_params(root / "params.yaml", {**_parse_overrides(overrides), "train.seed": seed})
    torch.set_num_threads(params.threads)  # as the train and evaluate stages do
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix=f"rrec-quality-{seed}-") as tmp:
            results, ranks = _train_and_evaluate(params, _scratch(root, Path(tmp)), methods)
    else:
        project = workdir / f"seed-{seed}"
        paths = Paths(project) if project.exists() else _scratch(root, project)
        results, ranks = _train_and_evaluate(params, paths, methods)
    out.write_text(json.dumps({"results": results, "ranks": ranks}))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", type=Path, default=None, help="the project (default: .)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["contrastive", "recpo"])
    ap.add_argument(
        "-S", dest="overrides", action="append", default=[], help="key=value on top of params.yaml"
    )
    ap.add_argument("--out", type=Path, help="also write the per-seed results as JSON here")
    ap.add_argument("--workdir", type=Path, help="keep the per-seed projects here and reuse unchanged methods")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one seed, results to this file
    # this folder's helper, imported here: tests import this module by its file alone
    import bench_project

    bench_project.add_arguments(ap)
    args = ap.parse_args()
    root = (args.root or Path(".")).resolve()
    if args.worker:
        _one_seed(root, args.seeds[0], args.methods, args.overrides, args.worker, args.workdir)
        return
    with bench_project.Workspace(args.build_into, "quality_") as ws:
        backbone, use_root = bench_project.choose(root, args.backbone, explicit=args.root is not None)
        if not use_root:
            root = bench_project.build_project(ws.project, backbone)[1].root.resolve()
        over_seeds(args, root)


def over_seeds(args: argparse.Namespace, root: Path) -> None:
    per_seed: dict[str, dict[str, list[dict[str, float]]]] = {}
    references: dict[str, dict[str, dict[str, float]]] = {}
    seed_ranks: dict[str, dict[str, list[dict[int, int]]]] = {}
    for seed in args.seeds:
        # each seed in a process of its own: MLflow keeps per-process state about its store
        with tempfile.TemporaryDirectory(prefix="rrec-quality-") as tmp:
            result = Path(tmp) / "result.json"
            overrides = [a for o in args.overrides for a in ("-S", o)]
            cmd = [sys.executable, __file__, "--root", str(root), "--seeds", str(seed)]
            cmd += ["--worker", str(result), "--methods", *args.methods, *overrides]
            if args.workdir:
                cmd += ["--workdir", str(args.workdir.resolve())]
            subprocess.run(cmd, check=True)
            worker = json.loads(result.read_text())
            for name, by_split in worker["ranks"].items():
                for split, by_id in by_split.items():
                    seed_ranks.setdefault(name, {}).setdefault(split, []).append(
                        {int(e): r for e, r in by_id.items()}
                    )
            for name, by_split in worker["results"].items():
                if name in args.methods:
                    for split, metrics in by_split.items():
                        per_seed.setdefault(name, {}).setdefault(split, []).append(metrics)
                    print(f"seed {seed} {name}: test ndcg@10 {by_split['test']['ndcg@10']:.4f}", flush=True)
                else:
                    references[name] = by_split

    baselines_file = root / "reports" / "eval" / "baselines.json"
    if baselines_file.exists():
        for name, res in json.loads(baselines_file.read_text()).items():
            references.setdefault(name, {"test": res["test"], "valid": res.get("best_valid", {})})

    print(f"\nseeds {args.seeds}; mean ± standard deviation over seeds for the LLM methods\n")
    for split in ("valid", "test"):
        print(f"{split}:\n")
        print("| method | n | " + " | ".join(COLUMNS) + " |")
        print("|---|---|" + "---|" * len(COLUMNS))
        for name, by_split in references.items():
            m = by_split.get(split) or {}
            if m:
                print(
                    f"| {name} | {int(m.get('n', 0))} | "
                    + " | ".join(f"{m[c]:.4f}" for c in COLUMNS)
                    + " |"
                )
        for name, by_split in per_seed.items():
            runs = by_split[split]
            cells = []
            for c in COLUMNS:
                values = [r[c] for r in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
            print(f"| {name} | {int(runs[0]['n'])} | " + " | ".join(cells) + " |")
        print()
    comparisons = {}
    base, *others = args.methods
    for other in others:
        print(f"paired, {other} − {base}, NDCG@10 on the same examples (mean over seeds; "
              "95 % bootstrap interval over examples):\n")
        for split, stats in print_paired(seed_ranks[base], seed_ranks[other]).items():
            comparisons[f"{other}-{base}/{split}"] = stats
        print()
    if args.out:
        out = {"per_seed": per_seed, "references": references, "paired": comparisons}
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
