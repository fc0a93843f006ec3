"""Convert a merged HF model folder to a GGUF file with the pinned llama.cpp converter.

Runs `convert_hf_to_gguf.py` and `gguf-py` from the same verified llama.cpp
source that the quantizer and the runtime were built from. The converter
writes to its output name directly, so here it writes a scratch file that is
copied, with cpuforge's provenance added to the GGUF metadata, to a `.partial`
name, renamed only when all of it succeeded.

The GGUF must tokenize as transformers does with the merged folder, and the
converter reads tokenizer files its own way. So it reads a staged view of the
folder whose sentencepiece files state what transformers uses (scores in the
order of tokenizer.json's merges, tokenizer.json's added tokens), and the copy
states transformers' BOS/EOS behaviour and chat template in the metadata.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output, read_json, write_json
from cpuforge.io.gguf import read_metadata
from cpuforge.io.provenance import copy_gguf_with_provenance
from cpuforge.io.safetensors import safetensors_header
from cpuforge.merge.merge import write_model_files
from cpuforge.merge.plan import check_inputs

log = logging.getLogger(__name__)


OUTTYPES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}  # bytes per weight


def check_space(model: Path, out: Path, outtype: str) -> None:
    """Fail before converting when the output's filesystem cannot hold the scratch file and its copy."""
    weights = sum(
        math.prod(t["shape"]) for f in sorted(model.glob("*.safetensors")) for t in safetensors_header(f).values()
    )
    need = 2 * weights * OUTTYPES[outtype] + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise InputError(
            f"{out.parent}: {free / 2**20:.1f} MiB free, but converting {model} to {outtype} needs about "
            f"{need / 2**20:.1f} MiB (the GGUF twice, while provenance is added)."
        )


def hf_tokenizer_metadata(tokenizer) -> dict:
    """GGUF tokenizer metadata that states what the transformers tokenizer does: whether it adds BOS
    and EOS (probed, since tokenizer_config.json flags and tokenizer.json's post-processor can
    disagree, and the converter trusts the latter) and the chat template it renders."""
    probe = "cpuforge probe"
    ids = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    metadata = {
        "tokenizer.ggml.add_bos_token": bos is not None and ids[:1] == [bos] and plain[:1] != [bos],
        "tokenizer.ggml.add_eos_token": eos is not None and ids[-1:] == [eos] and plain[-1:] != [eos],
    }
    if isinstance(tokenizer.chat_template, str):
        metadata["tokenizer.chat_template"] = tokenizer.chat_template
    return metadata


def is_sentencepiece_bpe(data: dict) -> bool:
    """A tokenizer.json made from a sentencepiece BPE model (LlamaConverter): BPE with byte fallback."""
    return data["model"]["type"] == "BPE" and bool(data["model"].get("byte_fallback"))


def sentencepiece_model(data: dict, original: Path) -> bytes:
    """A sentencepiece model holding tokenizer.json's vocabulary, each piece scored by the rank of the
    first merge that makes it (-rank), so llama.cpp, which merges the highest-scored pair first, merges
    in transformers' order. The original tokenizer.model lends its specs when its pieces are the same."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    model = data["model"]
    pieces = {i: p for p, i in model["vocab"].items()}
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    rank = {}
    for i, (left, right) in enumerate(merges):
        rank.setdefault(left + right, i)
    proto = sp.ModelProto()
    if original.is_file():
        proto.ParseFromString(original.read_bytes())
    if [p.piece for p in proto.pieces] != [pieces[i] for i in range(len(pieces))]:
        proto = sp.ModelProto()
        proto.trainer_spec.model_type = sp.TrainerSpec.BPE
        proto.trainer_spec.byte_fallback = True
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = True
        proto.normalizer_spec.remove_extra_whitespaces = False
        special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        kinds = sp.ModelProto.SentencePiece
        for i in range(len(pieces)):
            kind = (
                kinds.UNKNOWN if pieces[i] == model.get("unk_token")
                else kinds.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", pieces[i])
                else kinds.CONTROL if i in special
                else kinds.NORMAL
            )  # fmt: skip
            proto.pieces.append(kinds(piece=pieces[i], type=kind))
    for i, piece in enumerate(proto.pieces):
        piece.score = -float(rank.get(piece.piece, len(merges) + i))
    return proto.SerializeToString()


def stage_for_converter(model: Path, stage: Path) -> list[str]:
    """Fill `stage` with links to the merged folder's files and, for a sentencepiece tokenizer, the
    tokenizer.model and tokenizer_config.json that state what transformers uses: the converter takes
    scores from tokenizer.model (without one it gives every piece the same score, and merges at
    random) and added tokens from tokenizer_config.json's added_tokens_decoder, which transformers 5
    no longer writes (without it the added words become unused [PAD] tokens). Returns what it restated."""
    stage.mkdir()
    restated = []
    tokenizer_json = model / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text(encoding="utf-8")) if tokenizer_json.is_file() else None
    if data is not None and is_sentencepiece_bpe(data):
        (stage / "tokenizer.model").write_bytes(sentencepiece_model(data, model / "tokenizer.model"))
        config = read_json(model / "tokenizer_config.json") if (model / "tokenizer_config.json").is_file() else {}
        fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        config["added_tokens_decoder"] = {
            str(t["id"]): {k: t[k] for k in fields if k in t} for t in data.get("added_tokens", [])
        }
        write_json(stage / "tokenizer_config.json", config, ensure_ascii=False)
        restated = ["tokenizer.model scores from tokenizer.json merges", "added tokens from tokenizer.json"]
    for f in sorted(model.iterdir()):
        if not (stage / f.name).exists() and not f.name.startswith("."):
            (stage / f.name).symlink_to(f.resolve())
    return restated


def converter_env(source: Path, threads: int = 1) -> dict[str, str]:
    """The converter's environment: the pinned gguf-py first; its torch work follows OMP_NUM_THREADS."""
    pythonpath = os.pathsep.join([str(source / "gguf-py"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads)}


def last_error_line(output: str) -> str:
    """What a failed converter said, without its traceback: the last line that is not a frame of one."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    frames = ("Traceback ", "File ", "^", "~")
    said = [line for line in lines if not line.startswith(frames) and not line.startswith("raise ")]
    return (said or lines or ["no output"])[-1]


def check_converter_vocab(source: Path, base: Path, adapters: list[Path], work: Path) -> dict:
    """Run the pinned converter's vocabulary-only mode on what the merged folder will carry (its
    config.json and tokenizer files, staged as convert stages them), in `work`, before the merge.

    A tokenizer the converter cannot read (a BPE pre-tokenizer it does not know, llama.cpp #8649)
    then fails here in seconds, in one sentence, not after the merge as a traceback. Returns what
    the converter made of it: tokenizer model, pre-tokenizer and number of tokens."""
    plan = check_inputs(base, adapters)
    folder, stage, vocab = work / "merged", work / "stage", work / "vocab.gguf"
    folder.mkdir(parents=True)
    write_model_files(base, plan, "f16", folder)
    stage_for_converter(folder, stage)
    cmd = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(stage), "--vocab-only", "--outfile", str(vocab)]
    log.info("running %s", " ".join(cmd))
    result = subprocess.run(cmd, env=converter_env(source), capture_output=True, text=True)
    if result.returncode != 0:
        log.debug("converter output:\n%s", result.stderr)
        raise InputError(
            f"{plan.tokenizer}: the pinned llama.cpp converter cannot read this tokenizer: "
            f"{last_error_line(result.stderr)}"
        )
    fields = read_metadata(vocab, ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens"])
    return {
        "tokenizer": str(plan.tokenizer),
        "model": fields.get("tokenizer.ggml.model"),
        "pre": fields.get("tokenizer.ggml.pre"),
        "tokens": len(fields.get("tokenizer.ggml.tokens", [])),
    }


def convert(source: Path, model: Path, out: Path, outtype: str, threads: int, record: dict, name: str) -> None:
    from transformers import AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    check_space(model, out, outtype)
    metadata = hf_tokenizer_metadata(AutoTokenizer.from_pretrained(model))
    env = converter_env(source, threads)  # the converter has no thread flag
    with atomic_output(out) as tmp:
        stage, scratch = tmp.with_name(tmp.name + ".stage"), tmp.with_name(tmp.name + ".converter")
        stated = {k.rsplit(".", 1)[1]: v for k, v in metadata.items() if isinstance(v, bool)}
        stated["chat_template"] = "tokenizer.chat_template" in metadata
        record["tokenizer"] = {"restated": stage_for_converter(model, stage), **stated}
        cmd = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(stage),
               "--outfile", str(scratch), "--outtype", outtype, "--model-name", name]  # fmt: skip
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
        remove = () if "tokenizer.chat_template" in metadata else ("tokenizer.chat_template",)
        copy_gguf_with_provenance(scratch, tmp, "convert", record, metadata, remove)
        log.info("tokenizer stated as transformers uses it: %s", json.dumps(record["tokenizer"]))
