"""The quant search: the smallest GGUF (or the best within a size) that keeps the fine-tune's task quality.

sensitivity: how much each tensor's output moves in each candidate type, from ggml's own rounding of a
sample of its rows, weighted by the importance matrix (the model's own training data, never held-out rows);
frontier: the mixes that lose least for their size (a Lagrangian sweep over every tensor's types);
recipe: a mix as the file llama-quantize --tensor-type-file reads, and the check of a written file against it;
search: the mixes verified end to end (KL divergence and task accuracy on held-out data) until the gate decides.
"""
