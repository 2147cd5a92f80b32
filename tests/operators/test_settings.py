"""The operator settings files (`recipes/operators/`) are the paper's YAMLs, less what the model fills in."""
from __future__ import annotations

import pytest
import yaml

from models.operators import load_settings, operator_info, settings_file, settings_names, settings_operator
from tests.conftest import shared_file


def paper_yaml(name: str) -> str:
    """The paper's file for settings `name` (its `configs/` layout)."""
    if name == "mha":
        return "sequence_mixers/mha_timm.yaml"
    folder = "channel_mixers" if operator_info(settings_operator(name)).replaces == "mlp" else "sequence_mixers"
    return f"{folder}/{name}.yaml"


def test_every_operator_and_every_paper_operator_yaml_has_settings():
    names = settings_names()
    assert {settings_operator(n) for n in names} == {"mha", "swa", "hyena_se", "hyena_x", "hyena_y", "mamba2",
                                                      "mlp", "mlp_hyena_x"}
    assert {"mlp_ratio_3", "mlp_ratio_4", "mlp_ratio_6"} <= set(names)


@pytest.mark.parametrize("name", settings_names())
def test_settings_are_the_papers_without_the_width_and_a_token_tied_length(name):
    """The model fills the width key, and `l_max` of a channel mixer whose conv channels are the tokens; every
    other key and value is the paper's."""
    paper = yaml.safe_load(shared_file(f"grafting-configs/{paper_yaml(name)}").read_text())
    info = operator_info(settings_operator(name))
    filled = {info.width_key} | ({info.length_key} if info.replaces == "mlp" and info.length_key else set())
    assert load_settings(name) == {k: v for k, v in paper.items() if k not in filled}


def test_unknown_settings_and_operators_are_named():
    with pytest.raises(ValueError, match="known: .*hyena_x"):
        settings_file("hyena_q")
    with pytest.raises(ValueError, match="not named after an operator"):
        settings_operator("attention_ratio_2")
