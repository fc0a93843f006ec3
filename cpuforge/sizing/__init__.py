"""What each rule needs before it runs (peak memory, disk written, runtime), predicted from headers alone.

How each figure arises, so that the formulas can be checked against the code they describe:

- A step's processes start at BASE_MB: their interpreters and libraries, measured on a 2-layer model
  with LLaMA's 32000-token vocabulary, where the work is nothing; a step that holds tokenizers adds
  TOKENIZER_BYTES a token of the vocabulary.
- The merge holds one tensor at a time: the base tensor as read, an adapter's whole replacement, and
  for a LoRA target its f32 copy, the f32 delta and their f32 sum (peft's get_delta_weight).
- The torch stages (eval_perplexity_hf, eval_task_hf and the merged side of check_generation) stream
  the decoder one layer at a time (cpuforge.text.stream): the hidden states of every sequence in f32, beside
  the larger of one layer's weights in f32 with the tensor being read as stored and one sequence's
  activations inside the layer, or the output head as stored with HEAD_ROWS of its rows in f32 and a
  few chunks of POSITIONS positions' logits.
- A llama.cpp run reads the GGUF into memory once (not mapped: cpuforge.llama.runtime.LOAD_MODE), the
  matrices whose types this CPU's kernels interleave held repacked instead of as stored, and adds its KV
  cache (f16 K and V of every layer and position), its compute buffer (the graph of one micro-batch,
  chiefly that batch's logits) and its output buffer (the logits it keeps). llama-quantize holds one
  tensor mapped, its f32 copy and its quantized bytes.
- Disk is what a step writes, scratch included: the converter's and llama-quantize's output sits beside
  its copy (cpuforge.io.provenance) until the copy is complete.
- Runtimes are time limits: pessimistic rates of a small machine (forward passes at FLOPS_PER_THREAD,
  each generated token the time it takes to read the weights once, files at DISK_BYTES_PER_SECOND),
  times three.

Sizes are MiB (Snakemake's mem_mb and disk_mb, SLURM's --mem=…M), runtimes minutes. The modules, leaf first:
costs (the measured constants, a step's Cost and Need), model (a model's tensors from its headers),
gguf_size (a GGUF's tensors, predicted or read), parts (what a llama.cpp context, a streamed pass or a
quantizer costs), needs (one formula per rule), jobs (a workflow job's figures from the model spec), plan
(the plan table and the local preflight) and dag (their jobs, from Snakemake's own DAG).
"""
