"""Peak memory and wall time of cpuforge's merge vs. peft's merge_and_unload, on the same inputs.

    python -m benchmarks.merge [--workdir DIR] [--layers 22]

Builds a synthetic sharded Llama (random weights, TinyLlama-1.1B shape: ~4.4 GB in
f32 at 22 layers) and a LoRA on every projection, then runs each merge in its own
process, one after the other, reads each child's peak RSS from the kernel, checks
that both merged models hold the same tensors, and prints one table and the ratios.
Run by hand; it takes several minutes and ~15 GB of disk.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[4]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size="1GB")
"""


def make_inputs(workdir: Path, layers: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = workdir / "base", workdir / "adapter"
    if not base.is_dir():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
        model.save_pretrained(base, max_shard_size="1GB")
        # a word-level tokenizer of the model's vocabulary size: the merge checks that they agree
        from tokenizers import Tokenizer, models

        Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0")).save(
            str(base / "tokenizer.json")
        )
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(adapter)
        del model
    return base, adapter


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{' '.join(cmd)} failed")
    return seconds, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def same_tensors(a: Path, b: Path) -> float:
    """Largest |difference| between the tensors of two merged folders."""
    from safetensors import safe_open

    def index(folder):
        return {k: f for f in sorted(folder.glob("*.safetensors")) for k in safe_open(f, "pt").keys()}

    ia, ib = index(a), index(b)
    assert set(ia) == set(ib), set(ia) ^ set(ib)
    worst = 0.0
    for name in sorted(ia):
        with safe_open(ia[name], "pt") as fa, safe_open(ib[name], "pt") as fb:
            worst = max(worst, (fa.get_tensor(name) - fb.get_tensor(name)).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpuforge-merge-bench")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, adapter = make_inputs(args.workdir, args.layers)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30
    ours_out, peft_out = args.workdir / "merged-cpuforge", args.workdir / "merged-peft"
    ours = measure([sys.executable, "-m", "scripts.merge", "--base", str(base), "--adapter", str(adapter),
                    "--out", str(ours_out), "--threads", str(args.threads)])  # fmt: skip
    peft = measure([sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(peft_out), str(args.threads)])
    diff = same_tensors(ours_out, peft_out)
    print(f"base: {size:.2f} GiB in {len(list(base.glob('*.safetensors')))} shards, LoRA r=16 on 7 projections")
    print(f"{'':12}{'wall s':>10}{'peak RSS GiB':>14}")
    print(f"{'cpuforge':12}{ours[0]:>10.1f}{ours[1]:>14.2f}")
    print(f"{'peft':12}{peft[0]:>10.1f}{peft[1]:>14.2f}")
    print(f"ratio cpuforge/peft: wall {ours[0] / peft[0]:.2f}, peak RSS {ours[1] / peft[1]:.2f}")
    print(f"max |tensor difference| between the two outputs: {diff:.3g}")


if __name__ == "__main__":
    main()
