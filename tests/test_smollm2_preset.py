"""scripts/smollm2.sh: its overrides are valid params and make a SmolLM2 project."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from rrec.config import load_params
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "smollm2.sh"


def overrides() -> dict[str, str]:
    pairs = re.findall(r"-S\s+'?([\w.]+)=([^\s'\\]+)'?", SCRIPT.read_text())
    return dict(pairs)


def test_the_preset_is_a_valid_smollm2_configuration(tmp_path: Path):
    sets = overrides()
    assert sets["model.backbone"] == "smollm2-135m" and sets["model.lora.enabled"] == "true"
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in sets.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        assert leaf in node, f"{dotted}: not a key of params.yaml"
        node[leaf] = yaml.safe_load(value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    params = load_params(tmp_path / "params.yaml")
    assert params.model.end_of_turn_stops and params.model.lora.layers == 4
    assert params.train.steps_for("recpo") == 20 and params.train.steps_for("contrastive") == 60
