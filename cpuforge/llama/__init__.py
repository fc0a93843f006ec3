"""The pinned llama.cpp: its build, its runtime and tools, the quant types, and the steps that run them
(convert, convert_adapter, quantize, imatrix)."""
