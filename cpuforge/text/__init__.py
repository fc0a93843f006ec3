"""The text side of every stage: task data and prose, the one prompt path, greedy answers from either runtime, the streamed HF forward."""
