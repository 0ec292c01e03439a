"""Params shown in the documentation are valid params: every YAML block of README.md and
docs/*.md that looks like params (a top-level key is a params section) parses through the
params schema (rrec/config.py) on top of the committed params.yaml, and holds no value
that YAML reads as a date (DVC fails on those inside `dvc repro`: dates must be quoted)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from rrec.config import Params, parse_params

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = set(Params.model_fields)
_FENCE = re.compile(r"^```(?:yaml|yml)\s*\n(.*?)^```", re.M | re.S)
_UNQUOTED_DATE = re.compile(r"\b[\w.]+:\s*\d{4}-\d{2}-\d{2}\b")


def yaml_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number of the block's first line, text) of every ```yaml block."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def params_blocks() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        for line, text in yaml_blocks(path):
            tree = yaml.safe_load(text)
            if isinstance(tree, dict) and SECTIONS & set(tree):
                out.append((f"{path.name}:{line}", text))
    return out


def dates(node: Any, where: str = "") -> list[str]:
    """Dotted keys whose value YAML read as a date or a time."""
    if isinstance(node, dict):
        return [d for k, v in node.items() for d in dates(v, f"{where}.{k}" if where else str(k))]
    if isinstance(node, list):
        return [d for i, v in enumerate(node) for d in dates(v, f"{where}[{i}]")]
    return [f"{where} = {node}"] if isinstance(node, (dt.date, dt.datetime)) else []


def merged(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in over.items()}}
    return over


def test_the_docs_show_params() -> None:
    assert params_blocks(), "README.md lost its params example (a ```yaml block with data: ...)"


@pytest.mark.parametrize(("where", "text"), params_blocks(), ids=lambda v: str(v)[:40])
def test_params_blocks_in_the_docs_are_valid_params(where: str, text: str) -> None:
    tree = yaml.safe_load(text)
    bad = dates(tree)
    assert not bad, (
        f"{where}: YAML reads {bad} as a date, and `dvc repro` then fails inside DVC; "
        "quote it, e.g. end: '2023-10-01'"
    )
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    parse_params(merged(committed, tree), where)  # raises ConfigError naming the key


def test_params_yaml_comments_quote_their_dates() -> None:
    comments = [line for line in (ROOT / "params.yaml").read_text().splitlines()
                if line.lstrip().startswith("#")]
    unquoted = [m.group(0) for line in comments for m in _UNQUOTED_DATE.finditer(line)]
    assert not unquoted, f"params.yaml comments show unquoted dates {unquoted}: quote them"


def test_an_unquoted_date_is_caught() -> None:
    assert dates(yaml.safe_load("data:\n  window: {end: 2023-10-01}\n")) == [
        "data.window.end = 2023-10-01"
    ]
    assert dates(yaml.safe_load("data:\n  window: {end: '2023-10-01'}\n")) == []


def leaves(node: Any, where: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in leaves(sub, f"{where}.{key}" if where else str(key)).items()}
    return {where: node}


def test_method_doc_shows_the_committed_values() -> None:
    """docs/method.md's params block says "the committed values": it must not drift."""
    text = (ROOT / "docs" / "method.md").read_text()
    section = text[text.index("## The params of the method"):]
    block = yaml.safe_load(_FENCE.search(section).group(1))
    committed = leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    drift = {k: (v, committed.get(k)) for k, v in leaves(block).items() if committed.get(k) != v}
    assert not drift, f"docs/method.md shows (doc, params.yaml): {drift}"
