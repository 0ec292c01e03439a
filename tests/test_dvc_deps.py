"""`dvc.yaml` names, for every stage, each project file the stage's module imports
(directly or not): a change to any of them reruns the stage, and no stage reruns for a
file it does not use beyond what its deps' directories hold."""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _stages() -> dict[str, dict]:
    """{stage module: the union of the deps of its dvc.yaml stages}."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out: dict[str, dict] = {}
    for name, stage in spec.items():
        body = stage.get("do", stage)
        module = body["cmd"].split()[2]  # python -m <module> ...
        assert module.startswith("rrec.stages."), f"stage {name} runs {body['cmd']!r}, not a stage module"
        out.setdefault(module, {"deps": set(), "stage": name})["deps"].update(body.get("deps", []))
    return out


STAGES = _stages()
GRAPH = grimp.build_graph("rrec")


def module_file(module: str) -> str:
    path = REPO / Path(*module.split("."))
    return f"{path.relative_to(REPO)}/__init__.py" if path.is_dir() else f"{path.relative_to(REPO)}.py"


def covered(file: str, deps: set[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("module", sorted(STAGES))
def test_each_stage_depends_on_every_file_it_imports(module: str) -> None:
    imported = sorted(GRAPH.find_upstream_modules(module) | {module})
    files = [module_file(m) for m in imported]
    missing = [f for f in files if not covered(f, STAGES[module]["deps"])]
    assert not missing, f"dvc.yaml stage {STAGES[module]['stage']} ({module}) imports files it does not list as deps: {missing}"


@pytest.mark.parametrize("module", sorted(STAGES))
def test_no_stage_lists_code_it_does_not_import(module: str) -> None:
    imported = {module_file(m) for m in GRAPH.find_upstream_modules(module) | {module}}
    code = [d for d in STAGES[module]["deps"] if d.startswith("rrec")]
    unused = [d for d in code if not any(covered(f, {d}) for f in imported)]
    assert not unused, f"dvc.yaml stage {STAGES[module]['stage']} lists code it never imports: {unused}"


def test_top_level_plots_draw_columns_a_stage_writes() -> None:
    """Each top-level plot reads a file a stage declares and columns that file has (the
    committed reports are the pipeline's last run)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    declared = {
        next(iter(p)) if isinstance(p, dict) else p
        for stage in spec["stages"].values()
        for kind in ("outs", "plots")
        for p in stage.get("do", stage).get(kind, [])
    }
    declared = {d.replace("${key}", m).replace("${item}", m) for d in declared for m in ("contrastive", "recpo")}
    for plot in spec["plots"]:
        (name, body), = plot.items()
        for file, columns in body["y"].items():
            columns = [columns] if isinstance(columns, str) else columns
            assert file in declared, f"plot {name} reads {file}, which no stage writes"
            header = (REPO / file).read_text().splitlines()[0].split(",")
            assert body["x"] in header and set(columns) <= set(header), (name, header)
