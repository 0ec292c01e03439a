"""`rrec`: the command line of the project's library.

    rrec recommend --method recpo --history 12,40,7 --history 3,9 --k 10 [--json]
    rrec recommend --input requests.jsonl --json
    rrec catalogue add --meta new_meta.jsonl.gz
    rrec catalogue remove --asin B00XYZ --asin B00ABC --publish champion
    rrec log-model --method recpo --register

Catalogue updates are kept in `models/serving/<method>/`; `rrec recommend` and
`rrec log-model` serve from there once it exists. `--publish ALIAS` also registers the
updated model as a new version of `rrec-<category>` and moves ALIAS to it, so that
`mlflow models serve -m models:/rrec-<category>@ALIAS` serves the change once restarted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from rrec.config import ConfigError, Params, load_params
from rrec.paths import Paths

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
catalogue_app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Add, replace or remove items of a trained model's catalogue without retraining.",
)
app.add_typer(catalogue_app, name="catalogue")

ParamsOpt = Annotated[str, typer.Option("--params", help="parameter file, relative to --root")]
RootOpt = Annotated[str, typer.Option("--root", help="project root holding data/ and models/")]
MethodOpt = Annotated[str, typer.Option("--method", help="the trained method: recpo or contrastive")]
CatalogueMethodOpt = Annotated[
    str | None,
    typer.Option("--method", help="the trained method: recpo or contrastive (default: the one the --publish "
                                  "alias serves, else recpo)"),
]


def _project(params: str, root: str) -> tuple[Params, Paths]:
    try:
        return load_params(Path(root) / params), Paths(Path(root))
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _parse_history_option(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise _fail(f"--history {text!r}: give comma-separated item ids, e.g. --history 12,40,7") from None


def read_requests(path: Path) -> list[dict[str, Any]]:
    """A JSONL file of requests: each line a history (JSON list) or an object
    {"history": [...], "k": 10, "now": <ms>}."""
    if not path.exists():
        raise _fail(f"{path}: input file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise _fail(
            f"{path}:{line}: not UTF-8 text (byte {data[err.start:err.start + 1]!r} at offset "
            f"{err.start}); save the requests as UTF-8 JSON lines"
        ) from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise _fail(f"{path}:{n}: not valid JSON ({err.msg}); one request per line") from None
        if isinstance(value, list):
            value = {"history": value}
        if not isinstance(value, dict) or "history" not in value:
            raise _fail(f"{path}:{n}: a line must be a JSON list of items or an object with 'history'")
        unknown = sorted(set(value) - {"history", "k", "now"})
        if unknown:
            raise _fail(f"{path}:{n}: unknown field(s) {unknown}; the fields are history, k, now")
        out.append(value)
    if not out:
        raise _fail(f"{path}: holds no requests")
    return out


@app.command()
def recommend(
    history: Annotated[
        list[str] | None,
        typer.Option("--history", help="item ids, comma-separated, oldest first; repeat for more users"),
    ] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input", help="JSONL: a history (list) or {history, k, now} per line")
    ] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="how many items to recommend")] = 10,
    now: Annotated[int | None, typer.Option("--now", help="the time of the request in ms (default: now)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per history")] = False,
    method: MethodOpt = "recpo",
    params: ParamsOpt = "params.yaml",
    root: RootOpt = ".",
) -> None:
    """Recommend items for user histories with a trained model."""
    from rrec.serve.recommend import Recommender, RequestError

    requests: list[dict[str, Any]] = [{"history": _parse_history_option(h)} for h in history or []]
    if input_file is not None:
        requests += read_requests(input_file)
    if not requests:
        raise _fail("give at least one --history or an --input file")
    p, paths = _project(params, root)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per weights file otherwise
    try:
        rec = Recommender.from_dir(p, paths, method)
    except (FileNotFoundError, RuntimeError) as err:
        raise _fail(str(err)) from None
    try:
        results = rec.recommend(
            [r["history"] for r in requests],
            k=[r.get("k", k) for r in requests],
            now_ms=[r.get("now", now) for r in requests],
            progress=len(requests) > 1,
        )
    except RequestError as err:
        raise _fail(str(err)) from None
    for i, (req, res) in enumerate(zip(requests, results, strict=True)):
        if as_json:
            typer.echo(json.dumps({"request": i, **res.as_dict()}))
            continue
        shown = rec.parse_history(req["history"], req.get("now", now) or int(time.time() * 1000))
        history = [(j, rec.catalogue.parent_asin(j), rec.catalogue.title(j)) for j in shown.item_ids]
        typer.echo(render_text(i, history, res, rec.reasoning))


def render_text(
    index: int, history: list[tuple[int, str, str]], res: Any, reasoning: bool,
) -> str:
    """One request as text: the history (id, parent_asin, title; oldest first), the
    reasoning indented line by line, the ranked items and any note."""
    lines = [f"== request {index}: history, oldest first"]
    lines += [f"     [{item_id}] {title} ({asin})" for item_id, asin, title in history]
    if reasoning:
        text = res.reasoning.strip()
        lines.append(f"reasoning ({res.reasoning_tokens} tokens):" + ("" if text else " (empty)"))
        lines += [f"   | {line}" for line in text.splitlines()]
    lines.append("recommended:")
    for rank, item in enumerate(res.items, start=1):
        lines.append(f"{rank:3d}. [{item.item_id}] {item.title} ({item.parent_asin})  score {item.score:.3f}")
    if res.note:
        lines.append(f"note: {res.note}")
    return "\n".join(lines)


PublishOpt = Annotated[
    str | None,
    typer.Option("--publish", help="also register the updated model and move this alias (e.g. champion) to it"),
]


def _updated(params: str, root: str, method: str | None, out: Path | None, change: Any, publish: str | None) -> None:
    from transformers.utils import logging as hf_logging

    from rrec.serve.recommend import Recommender, serving_dir

    p, paths = _project(params, root)
    hf_logging.disable_progress_bar()
    if method is None:
        method = _served_method(p, paths, publish) if publish else None
        method = method or "recpo"
    target = out if out is not None else serving_dir(paths, method)
    try:
        rec = Recommender.from_dir(p, paths, method, updates=target)
        update = change(rec)
    except (FileNotFoundError, RuntimeError, KeyError, ValueError) as err:
        raise _fail(str(err).strip("'\"")) from None
    rec.save(target)
    report = {**update.as_dict(), "n_items": rec.n_items, "n_removed": rec.catalogue.n_removed, "saved_to": str(target)}
    if publish:
        from rrec.serve.pyfunc import publish_catalogue
        try:
            report["published"] = publish_catalogue(p, paths, method, target, publish)
        except (FileNotFoundError, RuntimeError) as err:  # TrackingUnavailable is a RuntimeError
            raise _fail(f"{err} (the change is saved in {target})") from None
        report["alias"] = publish
    else:
        report["note"] = ("saved for `rrec recommend` only; a model served by MLflow is unchanged until "
                          "published (--publish ALIAS)")
    typer.echo(json.dumps(report))


def _served_method(p: Params, paths: Paths, alias: str) -> str | None:
    """The method of the model `alias` serves (its version's or its run's `rrec.method`)."""
    from rrec import registry

    try:
        version = registry.model_version_by_alias(registry.model_name(p.data.category), alias, paths.root)
    except RuntimeError as err:  # TrackingUnavailable
        raise _fail(str(err)) from None
    return None if version is None else registry.version_method(version, paths.root)


@catalogue_app.command("add")
def catalogue_add(
    meta: Annotated[Path, typer.Option("--meta", help="Amazon 2023 metadata lines (.jsonl or .jsonl.gz)")],
    method: CatalogueMethodOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="default models/serving/<method>/")] = None,
    publish: PublishOpt = None,
    params: ParamsOpt = "params.yaml",
    root: RootOpt = ".",
) -> None:
    """Add items (new parent_asin) or replace them (known parent_asin), cleaned like the window stage."""
    from rrec.serve.catalogue_updates import add_items_from_file

    if not meta.is_file():  # before loading the model, which takes seconds
        raise _fail(f"{meta}: metadata file not found (--meta)")
    _updated(params, root, method, out, lambda rec: add_items_from_file(rec, meta), publish)


@catalogue_app.command("remove")
def catalogue_remove(
    asin: Annotated[list[str], typer.Option("--asin", help="parent_asin to remove; repeatable")],
    method: CatalogueMethodOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="default models/serving/<method>/")] = None,
    publish: PublishOpt = None,
    params: ParamsOpt = "params.yaml",
    root: RootOpt = ".",
) -> None:
    """Stop recommending items (their ids and rows stay, masked)."""
    from rrec.serve.catalogue_updates import remove_items

    _updated(params, root, method, out, lambda rec: remove_items(rec, asin), publish)


@app.command("log-model")
def log_model(
    method: MethodOpt = "recpo",
    register: Annotated[bool, typer.Option("--register", help="register as rrec-<category>")] = False,
    params: ParamsOpt = "params.yaml",
    root: RootOpt = ".",
) -> None:
    """Log the trained model (with its catalogue updates) as an MLflow pyfunc model."""
    from rrec.registry import model_name
    from rrec.serve.pyfunc import log_pyfunc

    p, paths = _project(params, root)
    try:
        uri = log_pyfunc(p, paths, method, model_name(p.data.category) if register else None)
    except (FileNotFoundError, RuntimeError) as err:
        raise _fail(str(err)) from None
    typer.echo(uri)


if __name__ == "__main__":
    app()
