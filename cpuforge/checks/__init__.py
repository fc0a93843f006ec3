"""The fidelity checks: a GGUF tokenizes, renders its chat template and answers as the merged HF model does."""
