"""What each stage cost and the report on it: perplexity and KL, task accuracy, speed; what the importance
matrix buys, a runtime LoRA's speed; records, gate, plots, page."""
