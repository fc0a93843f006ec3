"""Draftless speculative decoding's verdict (cpuforge.evaluate.speculation), and what scripts.serve takes from it
(cpuforge.serve.speculation); measured for real on the tiny model in tests/test_eval.py."""

from __future__ import annotations

import json

import pytest
from helpers.llama import SOURCE

from cpuforge.evaluate.speculation import verdict
from cpuforge.serve.speculation import AUTO, SETTINGS, serving_flags


def setting(tps: float, same: bool = True, acceptance: float | None = 0.5) -> dict:
    return {"flags": ["--spec-type", "x"], "tg_tps": tps, "tokens": 100, "drafted": 50, "accepted": 25,
            "acceptance": acceptance, "same_answers": same, "differing_rows": [] if same else [3]}  # fmt: skip


PLAIN = {**setting(10.0, acceptance=None), "flags": []}


def test_the_fastest_setting_with_the_same_answers_wins_only_beyond_the_tolerance():
    results = {"none": PLAIN, "a": setting(10.4), "b": setting(13.0, same=False), "c": setting(12.0)}
    decision = verdict(results, 5)
    assert decision["setting"] == "c" and decision["flags"] == ["--spec-type", "x"]
    assert decision["sentence"].startswith("c wins: 12.0 tokens/s against 10.0 plain (1.20×), 50 % of its drafts")
    # within the tolerance is no win; changed answers never are, however fast
    decision = verdict({"none": PLAIN, "a": setting(10.4), "b": setting(13.0, same=False)}, 5)
    assert decision["setting"] is None and decision["flags"] == []
    assert decision["sentence"] == ("No draftless speculation wins on this model here: the fastest, b, gives 13.0 "
                                    "tokens/s against 10.0 plain (1.30×); b changed answers; scripts.serve decodes "
                                    "plainly.")  # fmt: skip
    # faster with no draft accepted is the machine's noise, not speculation (measured so on the demo: 1.07×)
    idle = {**setting(12.0), "drafted": 0, "accepted": 0, "acceptance": None}
    decision = verdict({"none": PLAIN, "a": idle}, 5)
    assert decision["setting"] is None and "a had no draft accepted" in decision["sentence"]


def test_the_server_takes_the_reports_verdict_for_its_model(tmp_path):
    model = tmp_path / "results" / "m" / "ggml-model-q4_0.gguf"
    model.parent.mkdir(parents=True)
    model.touch()
    assert serving_flags(model, AUTO) == []  # no report: plain
    metrics = model.parent / "report" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"speculation": {"setting": "ngram-mod", "flags": SETTINGS["ngram-mod"]}}))
    assert serving_flags(model, AUTO) == ["--spec-type", "ngram-mod"]
    assert serving_flags(model, "none") == [] and serving_flags(model, "ngram-simple") == SETTINGS["ngram-simple"]
    metrics.write_text(json.dumps({"speculation": {"setting": None, "flags": []}}))
    assert serving_flags(model, AUTO) == []


@pytest.mark.parametrize("name", [n for n in SETTINGS if n != "none"])
def test_every_setting_is_a_spec_type_of_the_pinned_server(name, llama_bin):
    assert SETTINGS[name] == ["--spec-type", name]
    assert f'"{name}"' in (SOURCE / "common" / "speculative.cpp").read_text()
