"""Per-request latency of the unified R²ec model against a two-stage pipeline (paper, Appendix G).

- unified: the policy writes its reasoning greedily and the user state is read at
  `<answer>` by ONE cached decoder step on top of the generation's KV cache
  (`rrec.model.generation.HFEngine`, what `rrec.serve.Recommender` runs);
- two-stage: the same LM writes the same reasoning with the same generation code, then a
  SECOND full forward pass encodes prompt + reasoning + `<answer>` to get the user state
  (an LM writes a profile, a second pass encodes it for retrieval).

Both see the same prompts (the test split's user prompts), the same `max_new_tokens` and
greedy decoding, in batches of 1, 4 and 8 requests over `--queries` queries (the last
batch wraps around to the first queries). A request's latency is the wall time of its
batch (the paper divides it by the batch size; the script prints both, the ratio is the
same). Each batch is timed for both pipelines, alternating which goes first. The script
also checks that both pipelines wrote the same reasoning and read the same user state.

    python benchmarks/latency_bench.py [--root .] [--method recpo] [--queries 100] \
        [--batch-sizes 1 4 8] [--max-new-tokens N] [--threads 1] [--compile] [--aot]

With `--compile` (or `model.compile: true`) the decoder is compiled with `torch.compile`
for BOTH pipelines: their shared generation and the two-stage's second pass. With `--aot`
(`model.aot_single_requests: true`) batches of one are decoded, in BOTH pipelines, on the
decoder exported and compiled ahead of time by AOTInductor (`rrec.model.aot`); the
second pass stays on the `torch.compile`d (with `--compile`) or eager decoder, its
fastest form for one full pass. The warm-up batches also pay the compilations.

`--backbone` (`benchmarks/bench_project.py`): the project at `--root` (default: the
current folder) when its params name that backbone, else a project built with it by the
stage functions in `--build-into` or a temporary folder, where the method is trained for
two steps first (latency depends on the weights only through the reasoning they write;
the reasoning lengths are printed). A `--root` named on the command line with another
backbone is refused.

    python benchmarks/latency_bench.py --backbone smollm2-135m --build-into /tmp/bench_sm

Target: unified >= 1.25x faster at batch size 1 and never slower at 4 and 8.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import bench_project  # this folder's helper: --backbone, the project
import torch
from tqdm.auto import tqdm

from rrec.config import load_params
from rrec.model.generation import HFEngine
from rrec.model.two_headed import RecModel
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.serve.recommend import Recommender

Batch = list[list[int]]


def unified(model: RecModel, max_new_tokens: int) -> Callable[[Batch], tuple[torch.Tensor, Batch]]:
    engine = HFEngine(temperature=1.0, top_k=0, max_new_tokens=max_new_tokens)

    def run(batch: Batch) -> tuple[torch.Tensor, Batch]:
        roll = engine.generate(model, batch, greedy=True)
        return roll.user_states, roll.reasoning_ids

    return run


def two_stage(
    model: RecModel, max_new_tokens: int, second_pass_s: list[float]
) -> Callable[[Batch], tuple[torch.Tensor, Batch]]:
    """Appends the wall time of each call's second pass to `second_pass_s`."""
    # the same generation without its `<answer>` step (no user state)
    engine = HFEngine(temperature=1.0, top_k=0, max_new_tokens=max_new_tokens, read_states=False)

    def run(batch: Batch) -> tuple[torch.Tensor, Batch]:
        roll = engine.generate(model, batch, greedy=True)
        start = time.perf_counter()
        states = model.encode(roll.sequences(model.answer_token_id)).float().cpu()
        second_pass_s.append(time.perf_counter() - start)
        return states, roll.reasoning_ids

    return run


def batches(prompts: Sequence[list[int]], size: int) -> list[Batch]:
    n = len(prompts)
    return [[list(prompts[(s + j) % n]) for j in range(size)] for s in range(0, n, size)]


def timed(fn: Callable[[Batch], tuple[torch.Tensor, Batch]], batch: Batch) -> tuple[float, torch.Tensor, Batch]:
    """Wall time of one call, with Python's garbage collector paused as `timeit` does: after
    the compilations a full collection can take ~0.5 s and land on either pipeline."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gc.disable()
    try:
        start = time.perf_counter()
        states, reasoning = fn(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, states, reasoning
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="the project (default: .)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="relative to --root")
    bench_project.add_arguments(ap)
    ap.add_argument("--method", default="recpo")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: evaluate.max_new_tokens")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches per pipeline first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="model.compile: torch.compile the decoder, used by both pipelines (default: params.yaml's)",
    )
    ap.add_argument(
        "--aot", action=argparse.BooleanOptionalAction, default=None,
        help="model.aot_single_requests: batches of one decode on the decoder compiled ahead of "
        "time, in both pipelines (default: params.yaml's)",
    )
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    with bench_project.Workspace(args.build_into, "latency_bench_") as ws:
        root = args.root or Path(".")
        backbone, use_root = bench_project.choose(
            root, args.backbone, explicit=args.root is not None, params_file=root / args.params
        )
        if use_root:
            params_file = root / args.params
        else:
            _, built = bench_project.build_project(ws.project, backbone)
            bench_project.ensure_trained(built, [args.method])
            root, params_file = built.root, built.root / "params.yaml"
        bench(args, params_file, Paths(root))


def bench(args: argparse.Namespace, params_file: Path, paths: Paths) -> None:
    overrides = {"model.compile": args.compile, "model.aot_single_requests": args.aot}
    params = load_params(params_file, {k: v for k, v in overrides.items() if v is not None})
    rec = Recommender.from_dir(params, paths, args.method, device=args.device)
    if not rec.reasoning:
        raise SystemExit(f"method {args.method!r} was trained without reasoning; benchmark a recpo model")
    max_new = args.max_new_tokens or params.evaluate.max_new_tokens
    users = load_user_prompts(paths, "test").sample_users(args.queries, 0)
    prompts = rec.model.user_prompt_ids(users.conversations)
    second_pass_s: list[float] = []
    pipelines = {"unified": unified(rec.model, max_new), "two-stage": two_stage(rec.model, max_new, second_pass_s)}
    print(
        f"{args.method} model, backbone {params.model.backbone!r}, device {args.device}, "
        f"decoder {'compiled' if params.model.compile else 'eager'}"
        f"{', batches of one on the AOT-compiled decoder' if params.model.aot_single_requests else ''}, "
        f"{torch.get_num_threads()} CPU threads; {len(prompts)} queries, prompt length "
        f"{statistics.mean(map(len, prompts)):.0f} tokens on average, max_new_tokens {max_new}, greedy"
    )

    rows = []
    worst_state, same_text = 0.0, True
    with torch.no_grad():
        for size in args.batch_sizes:
            work = batches(prompts, size)
            for fn in pipelines.values():
                for b in work[: args.warmup]:
                    fn(b)
            gc.collect()
            times: dict[str, list[float]] = {name: [] for name in pipelines}
            second_pass_s.clear()
            lengths: list[int] = []
            for i, b in enumerate(tqdm(work, desc=f"batch size {size}", unit="batch", leave=False)):
                order = list(pipelines) if i % 2 == 0 else list(reversed(pipelines))
                out = {}
                for name in order:
                    seconds, states, reasoning = timed(pipelines[name], b)
                    times[name].append(seconds)
                    out[name] = (states, reasoning)
                (s_u, r_u), (s_t, r_t) = out["unified"], out["two-stage"]
                same_text &= r_u == r_t
                cos = torch.nn.functional.cosine_similarity(s_u.float(), s_t.float(), dim=-1)
                worst_state = max(worst_state, float((1 - cos).abs().max()))
                lengths += [len(r) for r in r_u]
            rows.append((size, times, statistics.mean(lengths), statistics.mean(second_pass_s)))

    print()
    print("latency of a request = wall time of its batch; the paper's per-request figure divides it by")
    print("the batch size (same ratio)")
    print(
        f"{'batch':>5} | {'unified ms':>20} | {'two-stage ms':>20} | {'two-stage/unified':>17} "
        f"| {'paper: ms/req (u / 2s)':>22} | {'2nd pass ms':>11} | reasoning tokens"
    )
    print("-" * 130)
    ok = True
    for size, times, mean_len, second in rows:
        u = [t * 1000 for t in times["unified"]]
        t2 = [t * 1000 for t in times["two-stage"]]
        ratio = statistics.mean(t2) / statistics.mean(u)
        ok &= ratio >= (1.25 if size == 1 else 1.0)
        sd = statistics.stdev if len(u) > 1 else (lambda _: 0.0)
        print(
            f"{size:>5} | {statistics.mean(u):>10.1f} ± {sd(u):>7.1f} | {statistics.mean(t2):>10.1f} ± {sd(t2):>7.1f} "
            f"| {ratio:>16.2f}x | {statistics.mean(u) / size:>10.1f} / {statistics.mean(t2) / size:>9.1f} "
            f"| {second * 1000:>11.1f} | {mean_len:.1f}"
        )
    print()
    for size, times, _, _ in rows:  # a single slow request shows here, not in the means
        u, t2 = (sorted(t * 1000 for t in times[name]) for name in ("unified", "two-stage"))
        print(
            f"batch {size}: median {statistics.median(u):.1f} / {statistics.median(t2):.1f} ms, "
            f"slowest {u[-1]:.1f} / {t2[-1]:.1f} ms (unified / two-stage)"
        )
    print(f"same reasoning from both pipelines: {same_text}; largest 1 - cos(h_unified, h_two_stage): {worst_state:.2e}")
    print(f"target (>= 1.25x at batch 1, >= 1.0x at larger batches): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
