"""GGUF reading in one place (cpuforge.io.gguf): what a header holds, and one sentence for a file that is not a
readable GGUF, whichever way it is broken."""

from __future__ import annotations

import numpy as np
import pytest

from cpuforge.errors import InputError
from cpuforge.io.gguf import check_gguf, gguf_context_length, open_gguf, read_header, read_metadata
from cpuforge.io.provenance import copy_gguf_with_provenance
from cpuforge.paths import gguf_commit

pytestmark = pytest.mark.unit


def write_gguf(path, context_length: int | None = 256):
    """A small real GGUF, written by gguf-py: a llama header and one f32 tensor."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch="llama")
    if context_length is not None:
        writer.add_context_length(context_length)
    writer.add_tensor("token_embd.weight", np.arange(4 * 32, dtype=np.float32).reshape(4, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_header_is_read_back(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", 256)
    fields = read_metadata(path)
    assert fields["general.architecture"] == "llama" and fields["llama.context_length"] == 256
    assert gguf_context_length(path) == 256
    (tensor,) = open_gguf(path).tensors
    assert tensor.name == "token_embd.weight" and float(tensor.data[-1][-1]) == 4 * 32 - 1


def test_the_header_reader_reads_what_gguf_py_reads(tmp_path):
    """read_header against gguf-py's GGUFReader: every field (arrays of strings, numbers and booleans among
    them) and every tensor's shape, type and size; arrays not asked for are skipped, their lengths kept."""
    from gguf import GGUFReader, GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(path, arch="llama")
    writer.add_context_length(256)
    writer.add_token_list(["<s>", "</s>", "▁hello", "日本"])
    writer.add_token_scores([0.0, -1.5, 2.25, 3.0])
    writer.add_add_bos_token(True)
    writer.add_rope_freq_base(10000.0)
    writer.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = GGUFReader(path)
    header = read_header(path, None)
    fields = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    assert header.fields == {f.name: f.contents() for f in fields}
    assert header.types == {f.name: tuple(int(t) for t in f.types) for f in fields}
    assert {t.name: (t.shape, t.type, t.n_elements, t.n_bytes) for t in header.tensors.values()} == {
        t.name: (tuple(int(d) for d in t.shape), t.tensor_type.name.lower(), int(t.n_elements), int(t.n_bytes))
        for t in reader.tensors
    }
    skipped = read_header(path)
    assert "tokenizer.ggml.tokens" not in skipped.fields and skipped.lengths["tokenizer.ggml.tokens"] == 4
    assert skipped.fields["llama.context_length"] == 256


def test_the_commit_comes_from_the_converters_provenance(tmp_path):
    """Written as the convert step writes it, read back as chat and serve find their build."""
    theirs = write_gguf(tmp_path / "theirs.gguf")
    copy_gguf_with_provenance(theirs, tmp_path / "ours.gguf", "convert", {"llama_cpp": {"commit": "c" * 40}})
    assert gguf_commit(tmp_path / "ours.gguf") == "c" * 40
    assert gguf_commit(theirs) is None


def test_no_context_length_is_said(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", None)
    with pytest.raises(InputError, match=r"m\.gguf: no llama\.context_length in the GGUF header\.$"):
        gguf_context_length(path)


@pytest.mark.parametrize("keep", [4, 8, 40, 200, -10])
def test_a_file_cut_short_is_one_sentence(tmp_path, keep):
    """Cut inside the header, the key-value data or the tensor data: numpy's IndexError or ValueError inside
    GGUFReader becomes one sentence naming the file, for every reader of GGUF metadata."""
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:keep])
    for read in (open_gguf, read_metadata, gguf_context_length, gguf_commit):
        with pytest.raises(InputError) as failure:
            read(cut)
        assert str(failure.value).startswith(f"{cut}: not a readable GGUF file (")
        assert str(failure.value).endswith(").") and "\n" not in str(failure.value)


def test_not_a_gguf_and_no_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(InputError) as failure:
        read_metadata(fake)
    assert str(failure.value) == f"{fake}: not a GGUF file (starts with b'PK\\x03\\x04', not b'GGUF')."
    with pytest.raises(InputError, match=r"gone\.gguf: file not found\.$"):
        check_gguf(tmp_path / "gone.gguf")
