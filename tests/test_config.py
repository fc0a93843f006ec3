"""The configuration's schema, read as the workflow reads it (snakemake.utils.validate), without a run."""

from __future__ import annotations

import copy

import pytest
import yaml
from helpers import REPO
from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config, validate

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


def test_a_config_that_names_only_its_models_runs_on_the_shipped_settings():
    """A user's --configfile lands on config.yaml, which Snakemake loads first: its models replace the demo
    entry, and everything it does not name (the llama.cpp pin among them, written only in config.yaml)
    comes from there; the schema fills nothing config.yaml already holds."""
    models = [{"name": "m", "base": "/models/base", "adapters": ["/models/lora"]}]
    config = copy.deepcopy(CONFIG)
    update_config(config, {"models": models})
    validate(config, str(SCHEMA))
    assert config["models"] == models
    assert config["llama_cpp"]["sdist"] == CONFIG["llama_cpp"]["sdist"]
    assert config["quant_types"] == CONFIG["quant_types"]


def test_the_pin_is_not_defaulted_by_the_schema():
    """The pin is written once, in config.yaml: a config without it is refused, not filled from a copy."""
    with pytest.raises(WorkflowError, match="'package' is a required property"):
        validate({"models": CONFIG["models"], "llama_cpp": {"sdist": {}}}, str(SCHEMA))


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


def test_auto_is_a_quant_type_and_its_types_are_ggml_types(tmp_path):
    """`auto` in quant_types is the quant search's file; auto_quant.types must each be a tensor type the search
    can offer (a llama-quantize mix name like q4_k_m is not one), once."""
    from cpuforge.spec import load_spec

    config = copy.deepcopy(CONFIG)
    update_config(config, {"quant_types": ["Q4_0", "Auto"]})
    validate(config, str(SCHEMA))
    spec = load_spec(config, REPO)
    assert spec.quant_types == ("q4_0", "auto") and spec.fixed_types == ("q4_0",)
    assert "iq2_xxs" in spec.auto_types and "q4_K" in spec.auto_types
    # the search chooses a file of the merged weights: runtime LoRA has no unmerged base of it to check
    assert [f for f in spec.lora_adapters() if "auto" in f] == []
    for types, sentence in (
        (["q8_0", "q4_k_m"], r"^config auto_quant\.types: 'q4_k_m' is not a ggml tensor type the search can offer"),
        (["q8_0", "f16"], r"'f16' is not a ggml tensor type the search can offer"),
        (["q8_0", "Q8_0"], r"^config auto_quant\.types: 'Q8_0' is listed twice\.$"),
    ):
        bad = copy.deepcopy(config)
        bad["auto_quant"]["types"] = types
        with pytest.raises(InputError, match=sentence):
            load_spec(bad, REPO)
    config["imatrix"]["enabled"] = False  # the types llama-quantize writes only with a matrix are left out
    assert [t for t in load_spec(config, REPO).auto_types if t.startswith("iq2") or t == "iq3_xxs"] == []


def test_the_importance_matrix_goes_to_every_type_that_reads_one_unless_told_otherwise():
    """imatrix.use_for [all] (the default): every quant type whose rounding reads the matrix is made with it;
    [] keeps it to the types that need one; off, none."""
    from cpuforge.spec import load_spec

    config = copy.deepcopy(CONFIG)
    update_config(config, {"quant_types": ["q4_0", "q8_0", "q4_k_m", "iq2_xxs", "f16", "auto"]})
    validate(config, str(SCHEMA))
    spec = load_spec(config, REPO)
    assert [q for q in spec.quant_types if spec.uses_imatrix(q)] == ["q4_0", "q4_k_m", "iq2_xxs"]
    config["imatrix"]["use_for"] = []
    assert [q for q in spec.quant_types if load_spec(config, REPO).uses_imatrix(q)] == ["iq2_xxs"]
    config["imatrix"]["use_for"] = ["q4_k_m"]
    assert [q for q in spec.quant_types if load_spec(config, REPO).uses_imatrix(q)] == ["q4_k_m", "iq2_xxs"]
    config["imatrix"] = {**config["imatrix"], "enabled": False, "use_for": ["all"]}
    config["quant_types"] = ["q4_0"]
    assert not load_spec(config, REPO).uses_imatrix("q4_0")


def test_a_gate_value_the_schema_lets_through_is_refused_by_name():
    from cpuforge.spec import load_spec

    config = copy.deepcopy(CONFIG)
    with pytest.raises(WorkflowError, match="confidence"):
        validate({**config, "eval": {**config["eval"], "gate": {"confidence": 1.0}}}, str(SCHEMA))
    config["eval"]["gate"]["max_disagreement"] = 2
    with pytest.raises(InputError, match=r"^eval\.gate\.max_disagreement: 2 is outside \[0, 1\]\.$"):
        load_spec(config, REPO)
