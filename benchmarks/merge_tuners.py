"""Peak memory of cpuforge's streamed merge for each peft tuner at the 7B widths, against the plan's figure.

    python -m benchmarks.merge_tuners [--workdir DIR] [--layers 1] [--tuner DORA ...] [--again]

Writes a LLaMA base of LLaMA-7B's widths (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000) but
`--layers` layers, in f32 with random weights, then for each tuner an adapter made by peft's get_peft_model on
q_proj, v_proj, up_proj and down_proj with its trainable tensors randomised (so the merge is a real one), each in a
process of its own. Then it merges each adapter with scripts.merge in a process of its own, reads that process's
peak RSS from the kernel, and prints it beside the plan's figure for the merge (the sizing's Need, mem_mb)
and their ratio, measured / plan.
The merge streams one tensor at a time, so its peak is set by the costliest tensor (the plan names it), not by
the number of layers: one layer measures what 32 would. A merge measured once is kept in the work folder;
--again measures it again. Run by hand; a tuner takes a minute or two (PiSSA's SVDs longer) and the work
folder ~4 GB.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # the widest input (down) and output (up) of a 7B layer
# tuner name -> (peft config class, its settings); LoRA's initialisations and DoRA under their own names
TUNERS = {
    "LORA": ("LoraConfig", dict(r=16, lora_alpha=32)),
    "DORA": ("LoraConfig", dict(r=16, lora_alpha=32, use_dora=True)),
    "PISSA": ("LoraConfig", dict(r=16, lora_alpha=16, init_lora_weights="pissa")),
    "OLORA": ("LoraConfig", dict(r=16, lora_alpha=16, init_lora_weights="olora")),
    "IA3": ("IA3Config", dict(feedforward_modules=["up_proj", "down_proj"])),
    "LOHA": ("LoHaConfig", dict(r=8, alpha=16)),
    "LOKR": ("LoKrConfig", dict(r=8, alpha=16, decompose_both=True)),
    "ADALORA": ("AdaLoraConfig", dict(init_r=12, lora_alpha=32, total_step=10)),
    "VERA": ("VeraConfig", dict(r=256)),
    "OFT": ("OFTConfig", dict(oft_block_size=32)),
    "BOFT": ("BOFTConfig", dict(boft_block_size=8)),
    "HRA": ("HRAConfig", dict(r=8)),
    "C3A": ("C3AConfig", dict(block_size=256)),
    "ROAD": ("RoadConfig", dict(variant="road_1", group_size=64)),
    "FOURIERFT": ("FourierFTConfig", dict(n_frequency=1000)),
}

MAKE_BASE = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from cpuforge.io.files import write_json
from cpuforge.sizing.model import Arch, llama_shapes
out, layers = Path(sys.argv[1]), int(sys.argv[2])
arch = Arch(layers, 4096, 32, 32, 11008, 32000)
torch.manual_seed(0)
tensors = {n: (torch.randn(s) * 0.02 if len(s) > 1 else torch.ones(s)) for n, s in llama_shapes(arch).items()}
out.mkdir(parents=True)
save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=arch.vocab, hidden_size=arch.hidden,
              intermediate_size=arch.ffn, num_hidden_layers=layers, num_attention_heads=arch.heads,
              num_key_value_heads=arch.kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
              tie_word_embeddings=False, torch_dtype="float32")
write_json(out / "config.json", config)
# a word-level tokenizer of the model's vocabulary size: the merge checks that they agree
Tokenizer(models.WordLevel({f"t{i}": i for i in range(arch.vocab)}, unk_token="t0")).save(str(out / "tokenizer.json"))
"""

MAKE_ADAPTER = """
import sys, json, torch, peft
from transformers import AutoModelForCausalLM
base, out, cls, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
torch.manual_seed(1)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = peft.get_peft_model(model, getattr(peft, cls)(**settings))
with torch.no_grad():  # trained-looking tensors, so every merge is a real one
    for _, param in model.named_parameters():
        if param.requires_grad:
            param.add_(torch.randn_like(param) * 0.01)
model.save_pretrained(out)
"""


def run(code: str, *args: str) -> None:
    subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, check=True)


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak RSS (MiB) of one child process, from the kernel (ru_maxrss: its VmHWM)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{' '.join(cmd)} failed")
    return usage.ru_maxrss / 1024  # KiB on Linux


def planned(base: Path, adapter: Path, dtype: str, threads: int) -> tuple[int, str]:
    """The plan's memory for this merge (the sizing's Need for rule merge, MiB) and the tensor that sets it."""
    from cpuforge.merge.plan import check_inputs
    from cpuforge.sizing.model import plan_model
    from cpuforge.sizing.needs import merge_need

    m = plan_model(check_inputs(Path(base), [Path(adapter)]), dtype)
    return merge_need(m, threads).mem_mb, m.merge_peak_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpuforge-merge-tuners")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tuner", action="append", choices=sorted(TUNERS), help="repeat; all when none given")
    parser.add_argument("--dtype", default="f16", help="the merged matrices' dtype (scripts.merge --dtype)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--again", action="store_true", help="measure again the merges measured before")
    args = parser.parse_args()
    base = args.workdir / f"base-{args.layers}"
    if not base.is_dir():
        run(MAKE_BASE, str(base), str(args.layers))
    print(f"7B widths (hidden 4096, intermediate 11008, 32 heads, vocab 32000), {args.layers} layer(s), f32 base, "
          f"merged to {args.dtype}; targets {', '.join(TARGETS)}")  # fmt: skip
    print(f"{'tuner':<10}{'plan MiB':>10}{'measured MiB':>14}{'ratio':>7}  the plan's costliest tensor")
    for name in args.tuner or TUNERS:
        cls, settings = TUNERS[name]
        adapter = args.workdir / f"adapter-{name.lower()}-{args.layers}"
        if not adapter.is_dir():
            run(MAKE_ADAPTER, str(base), str(adapter), cls, json.dumps({"target_modules": TARGETS, **settings}))
        # in a child too: a merge forked from a parent that has grown (torch, the plans) starts its ru_maxrss at
        # the parent's RSS, which hid OFT's, BOFT's and VeRA's peaks under 1706 MiB in a first run
        code = "import sys; from benchmarks.merge_tuners import planned; a = sys.argv; print(*planned(*a[1:4], int(a[4])))"
        answer = subprocess.run([sys.executable, "-c", code, str(base), str(adapter), args.dtype, str(args.threads)],
                                cwd=REPO, check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
        plan, tensor = int(answer[0]), answer[1]
        record = args.workdir / f"measured-{name.lower()}-{args.layers}-{args.dtype}.json"
        if args.again or not record.is_file():  # measured once; the plan's side is recomputed every run
            out = args.workdir / f"merged-{name.lower()}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = [sys.executable, "-m", "scripts.merge", "--base", str(base), "--adapter", str(adapter),
                   "--out", str(out), "--dtype", args.dtype, "--threads", str(args.threads)]  # fmt: skip
            record.write_text(json.dumps({"peak_rss_mib": peak_rss_mib(cmd)}))
            subprocess.run(["rm", "-rf", str(out)], check=True)
        measured = json.loads(record.read_text())["peak_rss_mib"]
        print(f"{name:<10}{plan:>10}{measured:>14.0f}{measured / plan:>7.2f}  {tensor}", flush=True)


if __name__ == "__main__":
    main()
