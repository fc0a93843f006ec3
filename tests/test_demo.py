"""The README's main job: `snakemake -c2 q4_model` on the embedded demo, end to end (ten minutes on 2 cores,
most of it training the demo's adapter on SmolLM2-135M). Left out of the default run, which keeps to tiny
models (pyproject.toml's addopts): `pytest -m demo` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.llama import BUILD_DIR, FLAVOUR
from helpers.workflow import snakemake

from cpuforge.text.task import TASK_DIR, load_split


@pytest.mark.slow
@pytest.mark.demo
def test_demo_q4_model(llama_bin, tmp_path):
    config = tmp_path / "build.yaml"
    # only the shared build; models stay the demo
    config.write_text(f"llama_cpp: {{build_dir: {BUILD_DIR}, cpu: {FLAVOUR}}}\n")
    snakemake(tmp_path, "q4_model", "--configfile", str(config))
    q4 = tmp_path / "results" / "demo" / "ggml-model-q4_0.gguf"
    f16 = tmp_path / "results" / "demo" / "ggml-model-f16.gguf"
    assert q4.stat().st_size < 0.4 * f16.stat().st_size

    figures = json.loads((tmp_path / "resources" / "demo" / "adapter" / "eval.json").read_text())
    em = figures["heldout_exact_match"]
    assert em["base+adapter"] >= 0.8 and em["base+adapter"] > em["base"] + 0.5
    assert "base+adapter held-out exact match" in (tmp_path / "logs" / "demo" / "train_demo_adapter.log").read_text()

    # the q4_0 file, through the binding on the pinned build, still answers the held-out task
    rows = load_split("heldout", TASK_DIR)[:10]
    code = (
        "import json, sys, llama_cpp\n"
        "m = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=2, verbose=False)\n"
        "for r in json.loads(sys.argv[2]):\n"
        "    msgs = [{'role': 'system', 'content': r['system']}, {'role': 'user', 'content': r['news']}]\n"
        "    out = m.create_chat_completion(msgs, temperature=0.0, max_tokens=48)\n"
        "    print(json.dumps(out['choices'][0]['message']['content'].strip()))\n"
    )
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(llama_bin)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(q4), json.dumps(rows)], env=env, capture_output=True, text=True, check=True
    )
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    correct = sum(a == r["answer"] for a, r in zip(answers, rows, strict=True))
    assert correct >= 8, answers
