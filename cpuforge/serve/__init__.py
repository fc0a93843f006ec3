"""A shipped model in use: the terminal chat and the OpenAI-compatible server in front of llama-server."""
