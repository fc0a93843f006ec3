"""A shipped model in use: the terminal chat and the OpenAI-compatible server in front of llama-server.

chat: the terminal chat. The server, split by role as llama.cpp's is: `server` wires the others (settings,
the port, running until a signal, draining); `engine` is the llama-server child (started, supervised,
restarted); `app` the HTTP routes and the checks made before llama-server; `relay` streams llama-server's
answers back; `completions` answers chat requests from token ids; `adapters` maps served names to LoRAs;
`speculation` the draftless speculation the server turns on; `metrics` and `errors` are the Prometheus
counters and the OpenAI error shapes.
"""
