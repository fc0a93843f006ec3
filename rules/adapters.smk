# Runtime LoRA: the adapters as GGUF LoRA files, applied at run time to the unmerged base
# (base-{qtype}.gguf, made by convert_base and quantize_base), instead of merged into it.


rule make_unmerged_base:
    input:
        unpack(get_unmerged_base_input),
    output:
        directory("results/{model}/base"),
    log:
        "logs/{model}/make_unmerged_base.log",
    benchmark:
        "benchmarks/{model}/make_unmerged_base.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=get_check_mem_mb,
        runtime=10,
    params:
        base=get_base,
        adapters=get_adapter_args,
    shell:
        "python -m scripts.make_unmerged_base --base {params.base:q} {params.adapters:q} --out {output:q} > {log:q} 2>&1"


rule convert_adapter:
    input:
        adapter=get_adapter_input,
        base="results/{model}/base",
        source=get_llama_source(),
    output:
        "results/{model}/adapters/{adapter}.gguf",
    log:
        "logs/{model}/convert_adapter_{adapter}.log",
    benchmark:
        "benchmarks/{model}/convert_adapter_{adapter}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=get_check_mem_mb,
        runtime=10,
    params:
        adapter=get_adapter_folder,
    shell:
        "python -m scripts.convert_adapter --source {input.source:q} --adapter {params.adapter:q} --hf {input.base:q}"
        " --out {output:q} --threads {threads} > {log:q} 2>&1"


rule check_runtime_lora:
    input:
        gguf="results/{model}/base-{stage}.gguf",
        merged="results/{model}/ggml-model-{stage}.gguf",
        # its tokenizer and template build the prompts both sides read
        tokenizer="results/{model}/merged",
        loras=get_adapter_ggufs,
        heldout=get_heldout,
        lib=f"{get_llama_bin()}/libllama.so",
    output:
        "results/{model}/checks/runtime-lora-{stage}.json",
    log:
        "logs/{model}/check_runtime_lora_{stage}.log",
    benchmark:
        "benchmarks/{model}/check_runtime_lora_{stage}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=get_runtime_check_mem_mb,
        runtime=get_generation_runtime,
    params:
        **config["checks"]["generation"],
        loras=get_lora_args,
        gate=get_runtime_gate_arg,
    shell:
        "python -m scripts.check_runtime_lora --gguf {input.gguf:q} {params.loras:q} --merged-gguf {input.merged:q}"
        ' --heldout {input.heldout:q} --llama-bin "$(dirname {input.lib:q})" --min-agreement {params.min_agreement}'
        " {params.gate:q} --max-new-tokens {params.max_new_tokens} --prompts {params.prompts} --threads {threads}"
        " --out {output:q} > {log:q} 2>&1"
