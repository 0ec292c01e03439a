"""Load test of the served recommender (`mlflow models serve`).

Starts `mlflow models serve --env-manager local` on 127.0.0.1 (a free port) for the
project's trained model, saved to a temporary directory as an MLflow model (or serves
`--model-uri`, e.g. `models:/rrec-Video_Games@champion`), or takes the `--url` of a
running server. Then `--clients` concurrent clients each send `--requests` requests one
after the other (the histories of the test split, round robin), and the script prints the
errors, the latency percentiles and the throughput, and stops the server it started (by
its process group id). It stops by itself: the number of requests is fixed and every
request has a timeout.

    python benchmarks/load_test.py [--root .] [--method recpo] [--clients 8] [--requests 50]
    python benchmarks/load_test.py --url http://127.0.0.1:5000
    python benchmarks/load_test.py --backbone smollm2-135m --build-into /tmp/bench_sm

`--backbone` (`benchmarks/bench_project.py`): the project at `--root` (default: the
current folder) when its params name that backbone, else a project built with it by the
stage functions in `--build-into` or a temporary folder, where the method is trained for
two steps first. A `--root` named on the command line with another backbone is refused.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import bench_project  # this folder's helper: --backbone, the project
import requests
from tqdm.auto import tqdm

from rrec.config import load_params
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.serve.server import model_server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_load(url: str, histories: list[list[int]], clients: int, per_client: int, k: int, timeout: float) -> None:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    bar = tqdm(total=clients * per_client, desc="requests", unit="req")

    def client(c: int) -> None:
        with requests.Session() as session:
            for i in range(per_client):
                history = histories[(c * per_client + i) % len(histories)]
                body = {"dataframe_records": [{"history": history, "k": k}]}
                start = time.perf_counter()
                try:
                    r = session.post(f"{url}/invocations", json=body, timeout=timeout)
                    ok = r.status_code == 200 and len(r.json()["predictions"][0]["items"]) == k
                    problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except (requests.RequestException, ValueError, KeyError, IndexError) as err:
                    problem = f"{type(err).__name__}: {err}"[:200]
                seconds = time.perf_counter() - start
                with lock:
                    if problem is None:
                        latencies.append(seconds)
                    else:
                        errors[problem] += 1
                    bar.update(1)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    bar.close()

    total = clients * per_client
    print(f"\n{clients} clients x {per_client} requests = {total} requests in {wall:.1f} s")
    print(f"errors: {sum(errors.values())}")
    for message, n in errors.most_common(5):
        print(f"  {n} x {message}")
    if latencies:
        ms = [s * 1000 for s in latencies]
        print(f"latency ms: p50 {percentile(ms, 50):.0f}, p90 {percentile(ms, 90):.0f}, "
              f"p99 {percentile(ms, 99):.0f}, mean {statistics.mean(ms):.0f}, max {max(ms):.0f}")
        print(f"throughput: {len(latencies) / wall:.2f} requests/s")
    if errors:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server; none is started")
    ap.add_argument("--model-uri", help="serve this MLflow model (default: the project's, saved to a temp dir)")
    ap.add_argument("--root", type=Path, default=None, help="the project (default: .)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="relative to --root")
    bench_project.add_arguments(ap)
    ap.add_argument("--method", default="recpo")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="per client")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--aot", action=argparse.BooleanOptionalAction, default=None,
        help="model.aot_single_requests for the saved model (default: params.yaml's)",
    )
    args = ap.parse_args()
    with bench_project.Workspace(args.build_into, "load_test_") as ws:
        root = args.root or Path(".")
        if args.url is None and args.model_uri is None:
            backbone, use_root = bench_project.choose(
                root, args.backbone, explicit=args.root is not None, params_file=root / args.params
            )
            if not use_root:
                _, built = bench_project.build_project(ws.project, backbone)
                bench_project.ensure_trained(built, [args.method])
                root, args.params = built.root, Path("params.yaml")
        elif args.backbone is not None:
            raise SystemExit("--backbone picks the project whose model is served; with --url or "
                             "--model-uri the model is already chosen")
        load(args, root)


def load(args: argparse.Namespace, root: Path) -> None:
    paths = Paths(root)
    histories = [h for h in load_user_prompts(paths, "test").histories if h]
    random.Random(args.seed).shuffle(histories)
    if args.url:
        run_load(args.url.rstrip("/"), histories, args.clients, args.requests, args.k, args.timeout)
        return
    with tempfile.TemporaryDirectory(prefix="rrec-load-") as tmp:
        model_uri = args.model_uri
        if model_uri is None:
            from rrec.serve.pyfunc import save_pyfunc

            overrides = {} if args.aot is None else {"model.aot_single_requests": args.aot}
            params = load_params(root / args.params, overrides)
            model_uri = str(save_pyfunc(params, paths, args.method, Path(tmp) / "model"))
        with model_server(model_uri, Path(tmp) / "server.log", workers=args.workers, start_timeout=args.start_timeout) as url:
            print(f"server answering at {url}", flush=True)
            run_load(url, histories, args.clients, args.requests, args.k, args.timeout)


if __name__ == "__main__":
    main()
