"""The fidelity checks: a GGUF tokenizes, renders its chat template and answers as the merged HF model does,
and a base with its GGUF LoRAs applied at run time answers as the merged GGUF does."""
