# Fidelity: every GGUF tokenizes, templates and answers as the merged model does.


rule check_tokenizer:
    input:
        unpack(get_check_input),
    output:
        "results/{model}/checks/tokenizer-{stage}.json",
    log:
        "logs/{model}/check_tokenizer_{stage}.log",
    benchmark:
        "benchmarks/{model}/check_tokenizer_{stage}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        base=get_base,
        task=get_task_args,
    shell:
        "python -m scripts.check_tokenizer --gguf {input.gguf:q} --merged {input.merged:q} --base {params.base:q}"
        ' {params.task:q} --llama-bin "$(dirname {input.lib:q})" --out {output:q} > {log:q} 2>&1'


rule check_chat_template:
    input:
        gguf="results/{model}/ggml-model-{stage}.gguf",
        merged="results/{model}/merged",
        heldout=get_heldout,
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        "results/{model}/checks/chat-template-{stage}.json",
    log:
        "logs/{model}/check_chat_template_{stage}.log",
    benchmark:
        "benchmarks/{model}/check_chat_template_{stage}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        heldout=get_heldout_arg,
    shell:
        "python -m scripts.check_chat_template --gguf {input.gguf:q} --merged {input.merged:q} {params.heldout:q}"
        ' --llama-bin "$(dirname {input.lib:q})" --out {output:q} > {log:q} 2>&1'


rule check_generation:
    input:
        gguf="results/{model}/ggml-model-f16.gguf",
        merged="results/{model}/merged",
        heldout=get_heldout,
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        "results/{model}/checks/generation.json",
    log:
        "logs/{model}/check_generation.log",
    benchmark:
        "benchmarks/{model}/check_generation.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        **config["checks"]["generation"],
    shell:
        "python -m scripts.check_generation --gguf {input.gguf:q} --merged {input.merged:q} --heldout {input.heldout:q}"
        ' --llama-bin "$(dirname {input.lib:q})" --min-agreement {params.min_agreement} --max-new-tokens {params.max_new_tokens}'
        " --prompts {params.prompts} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule compare_imatrix:
    input:
        f16="results/{model}/ggml-model-f16.gguf",
        merged="results/{model}/merged",
        quant="results/{model}/ggml-model-{qtype}.gguf",
        imatrix="results/{model}/imatrix.gguf",
        task=get_task_files,
        quantize=f"{SPEC.llama_bin}/llama-quantize",
        perplexity=f"{SPEC.llama_bin}/llama-perplexity",
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        "results/{model}/checks/imatrix-{qtype}.json",
    log:
        "logs/{model}/compare_imatrix_{qtype}.log",
    benchmark:
        "benchmarks/{model}/compare_imatrix_{qtype}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 16
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        **config["checks"]["imatrix"],
        heldout=get_heldout_arg,
    shell:
        'python -m scripts.compare_imatrix --llama-bin "$(dirname {input.lib:q})" --gguf {input.f16:q}'
        " --merged {input.merged:q} --quant {input.quant:q}"
        " --imatrix {input.imatrix:q} --type {wildcards.qtype} {params.heldout:q} --ctx-size {params.ctx_size}"
        " --chunks {params.chunks} --prompts {params.prompts} --threads {threads} --out {output:q} > {log:q} 2>&1"
