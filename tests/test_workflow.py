"""The whole chain on the tiny model, through Snakemake, with the real llama.cpp tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO
from helpers.llama import COMMIT
from helpers.models import make_lora
from helpers.workflow import planned_jobs, snakemake, write_config

Q4_0 = 2  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_0
F16 = 1  # llama_ftype LLAMA_FTYPE_MOSTLY_F16


@pytest.fixture(scope="module")
def tiny_run(llama_bin, tiny_base, tmp_path_factory):
    """Run q4_model on a private copy of the tiny model, so tests may change its adapter."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    base = shutil.copytree(tiny_base, workdir / "inputs" / "base")
    adapter = make_lora(base, workdir / "inputs" / "adapter")
    models = [{"name": "tiny", "base": str(base), "adapters": [str(adapter)]}]
    config = write_config(workdir / "tiny.yaml", models, merge={"verify": True})
    snakemake(workdir, "q4_model", "--configfile", str(config), umask=0o022)
    return workdir, config


@pytest.fixture
def restored_adapter(tiny_run):
    """tiny_run's adapter, put back as it was (bytes and mtimes) after a test that touches or replaces it, so the
    shared run is what every other test expects, whatever the order."""
    workdir, config = tiny_run
    adapter = workdir / "inputs" / "adapter"
    saved = {f: (f.read_bytes(), f.stat().st_atime_ns, f.stat().st_mtime_ns) for f in adapter.iterdir()}
    yield adapter
    for f, (data, atime, mtime) in saved.items():
        f.write_bytes(data)
        os.utime(f, ns=(atime, mtime))
    assert planned_jobs(workdir, "q4_model", "--configfile", str(config)) == {}


def modes(workdir):
    """Permission bits of every file and folder a run made (results, logs with the benchmark records), by path."""
    made = [p for d in ("results", "logs") for p in [workdir / d, *(workdir / d).rglob("*")]]
    return {str(p.relative_to(workdir)): p.stat().st_mode & 0o777 for p in made if not p.is_symlink()}


def test_artifacts_get_the_modes_of_the_umask(tiny_run):
    """Under umask 022 every artifact is readable by all (safetensors' writer alone gives 0600)."""
    workdir, _ = tiny_run
    found = modes(workdir)
    assert "results/tiny/merged/model.safetensors" in found and "results/tiny/ggml-model-q4_0.gguf" in found
    wrong = {p: oct(m) for p, m in found.items() if m != (0o755 if (workdir / p).is_dir() else 0o644)}
    assert not wrong


def gguf_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return reader, {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.ggml.")}


def test_chain_makes_a_real_q4_0_gguf(tiny_run):
    workdir, _ = tiny_run
    results = workdir / "results" / "tiny"
    f16, f16_fields = gguf_fields(results / "ggml-model-f16.gguf")
    q4, q4_fields = gguf_fields(results / "ggml-model-q4_0.gguf")
    assert q4_fields["general.architecture"] == "llama"
    assert (f16_fields["general.file_type"], q4_fields["general.file_type"]) == (F16, Q4_0)
    assert q4_fields["llama.block_count"] == 2 and q4_fields["llama.embedding_length"] == 64
    assert len(q4.tensors) == len(f16.tensors) == 2 + 2 * 9 + 1  # embeddings, norm, output; 9 per layer
    kinds = {t.name: t.tensor_type.name for t in q4.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["blk.1.ffn_down.weight"] == "Q4_0"
    assert (results / "ggml-model-q4_0.gguf").stat().st_size < 0.5 * (results / "ggml-model-f16.gguf").stat().st_size
    for name in ("merged", "ggml-model-f16.gguf", "ggml-model-q4_0.gguf"):
        assert (results / f"{name}.provenance.json").is_file()
    for log in ("merge.log", "convert.log", "quantize_q4_0.log"):
        assert (workdir / "logs" / "tiny" / log).stat().st_size > 0
    assert not list(results.rglob("*.partial"))
    merged = json.loads((results / "merged.provenance.json").read_text())
    # checked against peft's f32 model by the rule itself: the default f16 merge rounds each weight by up to
    # 2^-11 of it (measured here 3.3e-4 at most; an f32 merge stays below 1e-4)
    assert merged["dtype"] == "f16" and 0 < merged["verify_max_abs_logit_diff"] < 1e-3


def test_f16_gguf_holds_the_merged_weights(tiny_run):
    """The converter's f16 tensors equal the merged safetensors, rounded to f16."""
    from safetensors.numpy import load_file

    workdir, _ = tiny_run
    merged = load_file(workdir / "results" / "tiny" / "merged" / "model.safetensors")
    reader, _ = gguf_fields(workdir / "results" / "tiny" / "ggml-model-f16.gguf")
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.1.attn_v.weight"]
    want = merged["model.layers.1.self_attn.v_proj.weight"].astype(np.float16)
    assert np.array_equal(np.asarray(q.data).reshape(want.shape), want)


def test_q4_0_loads_in_the_binding_and_generates(tiny_run, llama_bin):
    """llama-cpp-python, bound to the pinned libllama, reads the file the quantizer wrote."""
    workdir, _ = tiny_run
    code = (
        "import sys, llama_cpp; m = llama_cpp.Llama(sys.argv[1], n_ctx=128, n_threads=2, verbose=False, seed=0);"
        "out = m.create_completion('The module', max_tokens=8, temperature=0.0);"
        "print(llama_cpp.__file__); print(out['usage']['completion_tokens']); print(repr(out['choices'][0]['text']))"
    )
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(llama_bin)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(workdir / "results" / "tiny" / "ggml-model-q4_0.gguf")],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    _, n_tokens, text = result.stdout.splitlines()
    assert int(n_tokens) == 8 and len(eval(text)) > 0
    maps = subprocess.run(
        [sys.executable, "-c", "import llama_cpp, sys; print(open('/proc/self/maps').read())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(llama_bin / "libllama.so") in maps


def test_second_run_has_nothing_to_do(tiny_run):
    workdir, config = tiny_run
    out = snakemake(workdir, "q4_model", "--configfile", str(config))
    assert "Nothing to be done" in out.stdout + out.stderr


def test_new_quant_type_reruns_only_quantize(tiny_run):
    workdir, config = tiny_run
    text = config.read_text() + "quant_types: [q4_0, q8_0]\n"
    more = config.with_name("more.yaml")
    more.write_text(text)
    # the new artifact and its parity checks
    assert planned_jobs(workdir, "quantized", "--configfile", str(more)) == {
        "quantize": 1, "check_tokenizer": 1, "check_chat_template": 1, "quantized": 1,
    }  # fmt: skip


def test_touched_adapter_with_the_same_bytes_reruns_nothing(tiny_run, restored_adapter):
    """Content, not mtime, decides: Snakemake compares the checksums it recorded (files up to
    --max-checksum-file-size, 1 MB by default; the tiny adapter is below it)."""
    workdir, config = tiny_run
    weights = restored_adapter / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    weights.write_bytes(weights.read_bytes())
    assert weights.stat().st_mtime_ns > before  # the file is newer than the outputs made from it
    assert planned_jobs(workdir, "q4_model", "--configfile", str(config)) == {}


def test_replaced_adapter_reruns_merge_and_after(tiny_run, restored_adapter, tmp_path):
    workdir, config = tiny_run
    make_lora(workdir / "inputs" / "base", tmp_path / "adapter2", seed=7)
    shutil.copy(tmp_path / "adapter2" / "adapter_model.safetensors", restored_adapter / "adapter_model.safetensors")
    jobs = planned_jobs(workdir, "q4_model", "--configfile", str(config))
    # q4_0 is made with the importance matrix (imatrix.use_for: [all]), which the new f16 GGUF makes again
    assert jobs == {
        "merge": 1, "convert": 1, "make_imatrix": 1, "quantize": 1, "check_tokenizer": 2, "check_chat_template": 2,
        "q4_model": 1,
    }  # fmt: skip


def test_user_models_replace_the_demo(tiny_run):
    workdir, config = tiny_run
    out = snakemake(workdir, "-n", "all", "--configfile", str(config)).stdout
    assert "make_demo_base" not in out and "results/demo" not in out


def test_gguf_carries_its_provenance(tiny_run, llama_bin):
    """The file alone tells its history, and `scripts.inspect` prints it, with the CPU code that runs it here."""
    from cpuforge.io.files import sha256_file
    from cpuforge.llama.runtime import cpu_backend

    workdir, _ = tiny_run
    results = workdir / "results" / "tiny"
    out = subprocess.run(
        [sys.executable, "-m", "scripts.inspect", str(results / "ggml-model-q4_0.gguf"), "--json"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    history = json.loads(out)
    assert history["general"]["general.name"] == "tiny"
    convert, quantize = history["cpuforge"]["convert"], history["cpuforge"]["quantize"]
    merged = workdir / "results" / "tiny" / "merged" / "model.safetensors"
    assert convert["inputs"]["model"]["model.safetensors"] == sha256_file(merged)
    assert quantize["inputs"]["gguf"]["ggml-model-f16.gguf"] == sha256_file(results / "ggml-model-f16.gguf")
    assert convert["llama_cpp"]["commit"] == quantize["llama_cpp"]["commit"] == COMMIT
    assert quantize["type"] == "q4_0" and set(quantize["versions"]) >= {"python", "torch", "transformers", "peft", "gguf"}
    sidecar = json.loads((results / "ggml-model-q4_0.gguf.provenance.json").read_text())
    assert sidecar == quantize
    assert history["cpu_backend"] == {"llama_bin": str(llama_bin.resolve()), **cpu_backend(llama_bin)}


def test_paths_with_a_space_a_quote_and_a_letter_beyond_ascii(llama_bin, tmp_path_factory):
    """Base, adapter, task data, configfile and --directory all under "my models/it's é", through the chain
    (q4_model with its parity checks), under umask 002: a group sharing the folder can read and write it all."""
    from helpers.models import PLAIN_CHAT_TEMPLATE, make_tiny_llama

    from cpuforge.text.task import load_split

    root = tmp_path_factory.mktemp("paths") / "my models" / "it's é"
    inputs = root / "inputs"
    base = make_tiny_llama(inputs / "llama 7b", chat_template=PLAIN_CHAT_TEMPLATE, add_bos=False)
    adapter = make_lora(base, inputs / "lora 'süß'")
    task = inputs / "task data"
    task.mkdir()
    for split, n in (("train", 8), ("heldout", 6)):
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in load_split(split)[:n]))
    model = {"name": "w", "base": str(base), "adapters": [str(adapter)],
             "task_data": {s: str(task / f"{s}.jsonl") for s in ("train", "heldout")}}  # fmt: skip
    config = write_config(root / "my config é.yaml", [model])
    workdir = root / "work dir"
    workdir.mkdir()
    snakemake(workdir, "q4_model", "--configfile", str(config), umask=0o002)
    results = workdir / "results" / "w"
    assert (results / "ggml-model-q4_0.gguf").is_file()
    for check in ("tokenizer-f16", "tokenizer-q4_0", "chat-template-f16", "chat-template-q4_0", "converter-vocab"):
        assert (results / "checks" / f"{check}.json").is_file()
    # the task data was read, from its odd path: every row's system prompt, news and answer (14 rows), each
    # tokenized alike by the GGUF and transformers (the record is written only then: its "passed" proves no more)
    task = json.loads((results / "checks" / "tokenizer-q4_0.json").read_text())["corpora"]["task"]
    assert task["samples"] == task["agree"] == 3 * (8 + 6) and not task["mismatches"]
    found = modes(workdir)
    wrong = {p: oct(m) for p, m in found.items() if m != (0o775 if (workdir / p).is_dir() else 0o664)}
    assert not wrong
