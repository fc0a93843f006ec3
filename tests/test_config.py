"""The configuration's schema, read as the workflow reads it (snakemake.utils.validate), without a run."""

from __future__ import annotations

import copy

import pytest
import yaml
from helpers import REPO
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cpuforge.errors import InputError
from cpuforge.llama.quant import check_quant_type

SCHEMA = REPO / "schemas" / "config.schema.yaml"
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def test_the_shipped_config_is_valid_and_every_key_is_documented():
    config = copy.deepcopy(CONFIG)
    validate(config, str(SCHEMA))

    def undocumented(schema, where="config"):
        """Keys without a description (an array's items are described by their key)."""
        missing = []
        for key, sub in schema.get("properties", {}).items():
            missing += ([] if "description" in sub else [f"{where}.{key}"]) + undocumented(sub, f"{where}.{key}")
        if isinstance(schema.get("items"), dict):
            missing += undocumented(schema["items"], f"{where}[]")
        return missing

    assert undocumented(yaml.safe_load(SCHEMA.read_text())) == []


def test_defaults_fill_a_config_that_names_only_its_models():
    config = {"models": [{"name": "m", "base": "/models/base", "adapters": ["/models/lora"]}]}
    validate(config, str(SCHEMA))
    # the pinned commit, in config.yaml and as the schema's default: one figure
    assert config["llama_cpp"]["sdist"]["commit"] == CONFIG["llama_cpp"]["sdist"]["commit"]
    assert config["quant_types"] == CONFIG["quant_types"]


@pytest.mark.parametrize(
    ("model", "sentence"),
    [
        ({"name": "m", "base": "demo"}, "'adapters' is a required property"),
        ({"name": "m", "base": "demo", "adapters": []}, "[] should be non-empty"),
        ({"name": "no spaces", "base": "demo", "adapters": ["demo"]}, "'no spaces' does not match"),
    ],
)
def test_a_malformed_model_names_the_key(model, sentence):
    with pytest.raises(WorkflowError) as error:
        validate({"models": [model]}, str(SCHEMA))
    assert sentence in str(error.value)


def test_an_unknown_quant_type_suggests_the_closest():
    assert check_quant_type("Q4_0") == "q4_0"
    with pytest.raises(
        InputError, match=r"^quant_types: unknown llama.cpp quantization type 'q4_O'; did you mean q4_0\?$"
    ):
        check_quant_type("q4_O")
    with pytest.raises(InputError, match=r"'q4_k_mm'; did you mean q4_k_m\?"):
        check_quant_type("q4_k_mm")
