"""cpuforge: LoRA adapters merged into a LLaMA-family model, converted, quantized, checked and served on CPUs.

The library under the workflow: `scripts/` holds one thin CLI per rule, each calling a function here.
"""
