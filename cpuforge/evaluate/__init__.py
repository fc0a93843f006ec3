"""What each stage cost and the report on it: perplexity and KL, task accuracy, speed; records, gate, plots, page."""
