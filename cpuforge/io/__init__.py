"""Reading and writing files: atomic outputs, safetensors a tensor at a time, GGUF metadata, provenance records."""
