"""The leaf every layer of cpuforge reads (as gguf-py's constants.py is for gguf-py): units and the names of a
LLaMA checkpoint's tensors. It imports nothing of cpuforge."""

MIB = 1 << 20

# the input embeddings and the output head of a LLaMA-family HF checkpoint; a base without lm_head ties it to
# the embeddings (tie_word_embeddings)
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
