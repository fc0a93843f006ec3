# Fidelity: every GGUF tokenizes, templates and answers as the merged model does.


rule check_tokenizer:
    input:
        unpack(get_check_input),
    output:
        catalogue.check("{model}", "tokenizer-{stage}"),
    log:
        "logs/{model}/check_tokenizer_{stage}.log",
    benchmark:
        "logs/benchmarks/{model}/check_tokenizer_{stage}.tsv"
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
        gguf=catalogue.gguf("{model}", "{stage}"),
        merged=catalogue.merged("{model}"),
        heldout=get_heldout,
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        catalogue.check("{model}", "chat-template-{stage}"),
    log:
        "logs/{model}/check_chat_template_{stage}.log",
    benchmark:
        "logs/benchmarks/{model}/check_chat_template_{stage}.tsv"
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
        gguf=catalogue.gguf("{model}", "f16"),
        merged=catalogue.merged("{model}"),
        heldout=get_heldout,
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        catalogue.check("{model}", "generation"),
    log:
        "logs/{model}/check_generation.log",
    benchmark:
        "logs/benchmarks/{model}/check_generation.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        **SPEC.checks["generation"],
    shell:
        "python -m scripts.check_generation --gguf {input.gguf:q} --merged {input.merged:q} --heldout {input.heldout:q}"
        ' --llama-bin "$(dirname {input.lib:q})" --min-agreement {params.min_agreement} --max-new-tokens {params.max_new_tokens}'
        " --prompts {params.prompts} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule compare_imatrix:
    input:
        f16=catalogue.gguf("{model}", "f16"),
        merged=catalogue.merged("{model}"),
        quant=catalogue.gguf("{model}", "{qtype}"),
        imatrix=catalogue.imatrix("{model}"),
        task=get_task_files,
        quantize=f"{SPEC.llama_bin}/llama-quantize",
        perplexity=f"{SPEC.llama_bin}/llama-perplexity",
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        catalogue.check("{model}", "imatrix-{qtype}"),
    log:
        "logs/{model}/compare_imatrix_{qtype}.log",
    benchmark:
        "logs/benchmarks/{model}/compare_imatrix_{qtype}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 16
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        **SPEC.checks["imatrix"],
        heldout=get_heldout_arg,
    shell:
        'python -m scripts.compare_imatrix --llama-bin "$(dirname {input.lib:q})" --gguf {input.f16:q}'
        " --merged {input.merged:q} --quant {input.quant:q}"
        " --imatrix {input.imatrix:q} --type {wildcards.qtype} {params.heldout:q} --ctx-size {params.ctx_size}"
        " --chunks {params.chunks} --prompts {params.prompts} --threads {threads} --out {output:q} > {log:q} 2>&1"
