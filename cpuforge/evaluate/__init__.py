"""What each stage cost: perplexity and KL, task accuracy, speed, and the report that gathers them with the quality gate."""
