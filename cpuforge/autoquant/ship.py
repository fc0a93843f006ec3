"""The search from its inputs to its three outputs: the chosen GGUF (its recipe in its provenance), the recipe
as llama-quantize's --tensor-type-file, and the search record."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cpuforge.autoquant import recipe
from cpuforge.autoquant.frontier import sweep
from cpuforge.autoquant.sensitivity import quantizable, read_table
from cpuforge.autoquant.tensors import Tensors
from cpuforge.autoquant.verify import Inputs, decide_file, made, summary, within_size
from cpuforge.errors import InputError
from cpuforge.evaluate.gate import Gate
from cpuforge.evaluate.perplexity import spread_logits
from cpuforge.evaluate.task import read_answers
from cpuforge.io.files import atomic_output, read_json, sha256_tree, write_json
from cpuforge.io.gguf import check_gguf, read_header, read_metadata
from cpuforge.io.provenance import copy_gguf_with_provenance, provenance, write_provenance
from cpuforge.llama.quant import listed_name
from cpuforge.llama.runtime import cpu_backend, cpu_name, describe_cpu_backend
from cpuforge.paths import source_record
from cpuforge.constants import MIB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What the search is asked: the ladder, the workflow's files of the listed types (scripts.quantize's), the
    objective or a size, the budget of mixes."""

    ladder: list[str]
    listed: list[Path]
    objective: str
    budget: int
    max_size_mib: float | None = None
    max_bpw: float | None = None


def auto_quant(llama_bin: Path, f16: Path, sensitivity: Path, imatrix: Path | None, logits: Path, ctx: int,
               merged: Path, rows: list[dict], reference: Path | None, max_new_tokens: int, gate: Gate,
               request: Request, bench: dict, threads: int, out: Path, recipe_out: Path,
               record_out: Path) -> None:  # fmt: skip
    """Choose the file to ship and write it, its recipe and the search record. `reference`: the f16 GGUF's
    answers to the held-out `rows` (eval_task's record); `bench`: tolerance_pct, gen_tokens, repetitions of the
    side-by-side speed runs."""
    if request.budget < 0:
        raise InputError(f"auto_quant.budget must be at least 0, got {request.budget}.")
    check_gguf(f16)
    answers = read_answers(reference, len(rows)) if rows else None
    listed, given = listed_files(request.listed, imatrix)
    table = read_table(sensitivity)
    header = read_header(f16)
    shapes = {t.name: t.n_elements for t in header.tensors.values() if quantizable(t.name, t.shape)}
    if set(table) != set(shapes):
        raise InputError(f"{sensitivity}: its tensors are not those of {f16}; measure it again.")
    n_elements = sum(shapes.values())
    fixed = f16.stat().st_size - sum(header.tensors[n].n_bytes for n in shapes)
    max_bytes = None
    if request.max_size_mib is not None:
        max_bytes = int(request.max_size_mib * MIB) - fixed
    elif request.max_bpw is not None:
        max_bytes = int(request.max_bpw * n_elements / 8)
    backend = cpu_backend(llama_bin)
    cpu = {"cpu": cpu_name(), "backend": describe_cpu_backend(backend)}
    log.info("deciding for %s by %s on %s, %s", f16.name, request.objective if max_bytes is None else "size",
             cpu["cpu"], cpu["backend"])  # fmt: skip
    started = time.monotonic()
    with atomic_output(out) as tmp:
        quantized, spread = tmp.with_name(tmp.name + ".tensors"), tmp.with_name(tmp.name + ".logits")
        inp = None
        try:
            spread_logits(logits, spread)  # a KL run's first windows spread over the text: decided early on them
            tensors = Tensors(llama_bin, f16, imatrix, quantized, threads)
            inp = Inputs(llama_bin, f16, imatrix, tensors, spread, ctx, merged, rows, max_new_tokens, threads, tmp,
                         gate, request.objective, bench["tolerance_pct"] / 100, bench["gen_tokens"],
                         bench["repetitions"], answers, given)  # fmt: skip
            if max_bytes is None:
                best, candidates = decide_file(inp, table, request.ladder, listed, request.budget)
            else:
                best, candidates = within_size(inp, sweep(table), max_bytes)
            source = source_record(llama_bin)
            inputs = {"gguf": f16, "sensitivity": sensitivity, "logits": logits, **({"imatrix": imatrix} if imatrix else {})}
            record = provenance(out, inputs, step="quantize", type="auto", candidate=best["name"],
                                recipe=best["types"], llama_cpp=read_json(source) if source.is_file() else None)  # fmt: skip
            copy_gguf_with_provenance(made(inp, best), tmp, "quantize", record)
            recipe.check_written(tmp, best["types"])
        finally:
            shutil.rmtree(quantized, ignore_errors=True)
            spread.unlink(missing_ok=True)
            for path in (inp.files.values() if inp else ()):
                path.unlink(missing_ok=True)
    write_provenance(out, record)
    with atomic_output(recipe_out) as tmp:
        recipe.write(tmp, best["types"])
    write_json(record_out, summary(best, candidates, table, inp, request.budget, max_bytes,
                                   time.monotonic() - started, cpu))  # fmt: skip
    f = best.get("fidelity")
    log.info("chosen: %s, %.1f MiB (%.2f bpw), %.1f t/s, KL %.4f%s", best["name"], best["size_bytes"] / MIB,
             best["bpw"], best["tg_tps"], best["kl_divergence"],
             f", {f['agree']}/{f['rows']} answers as the f16 GGUF's" if f else "")  # fmt: skip


def listed_files(paths: list[Path], imatrix: Path | None) -> tuple[list[str], dict[str, Path]]:
    """The listed types, and the workflow's files of them by candidate name (llama.quant.listed_name): each
    file's quantize record says its type and whether the importance matrix, this one, went into it."""
    types, given = [], {}
    ours = sha256_tree(imatrix) if imatrix is not None and paths else None
    for path in paths:
        text = read_metadata(path, ["cpuforge.quantize"]).get("cpuforge.quantize")
        if text is None:
            raise InputError(f"{path}: no cpuforge.quantize record in its header; give the files scripts.quantize "
                             "wrote.")  # fmt: skip
        record = json.loads(text)
        used = record["inputs"].get("imatrix")
        if used is not None and imatrix is None:
            raise InputError(f"{path}: made with an importance matrix, where the search is given none (--imatrix).")
        if used is not None and used != ours:
            raise InputError(f"{path}: made with another importance matrix than {imatrix}; make it again.")
        types.append(record["type"])
        given[listed_name(record["type"], used is not None)] = path
    return list(dict.fromkeys(types)), given
