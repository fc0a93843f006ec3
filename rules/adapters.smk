# Runtime LoRA: the adapters as GGUF LoRA files, applied at run time to the unmerged base
# (base-{qtype}.gguf, made by convert_base and quantize_base), instead of merged into it.


rule make_unmerged_base:
    input:
        unpack(get_unmerged_base_input),
    output:
        directory(catalogue.unmerged("{model}")),
    log:
        "logs/{model}/make_unmerged_base.log",
    benchmark:
        "logs/benchmarks/{model}/make_unmerged_base.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        base=get_base,
        adapters=get_adapter_args,
    shell:
        "python -m scripts.make_unmerged_base --base {params.base:q} {params.adapters:q} --out {output:q} > {log:q} 2>&1"


rule convert_adapter:
    input:
        adapter=get_adapter_input,
        base=catalogue.unmerged("{model}"),
        source=SPEC.llama_source,
    output:
        catalogue.adapter("{model}", "{adapter}"),
    log:
        "logs/{model}/convert_adapter_{adapter}.log",
    benchmark:
        "logs/benchmarks/{model}/convert_adapter_{adapter}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        adapter=get_adapter_folder,
    shell:
        "python -m scripts.convert_adapter --source {input.source:q} --adapter {params.adapter:q} --hf {input.base:q}"
        " --out {output:q} --threads {threads} > {log:q} 2>&1"


rule check_runtime_lora:
    input:
        gguf=catalogue.gguf("{model}", "{stage}", catalogue.BASE),
        merged=catalogue.gguf("{model}", "{stage}"),
        # its tokenizer and template build the prompts both sides read
        tokenizer=catalogue.merged("{model}"),
        loras=get_adapter_ggufs,
        heldout=get_heldout,
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        catalogue.check("{model}", "runtime-lora-{stage}"),
    log:
        "logs/{model}/check_runtime_lora_{stage}.log",
    benchmark:
        "logs/benchmarks/{model}/check_runtime_lora_{stage}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        **SPEC.checks["generation"],
        loras=get_lora_args,
        gate=get_runtime_gate_arg,
    shell:
        "python -m scripts.check_runtime_lora --gguf {input.gguf:q} {params.loras:q} --merged-gguf {input.merged:q}"
        ' --heldout {input.heldout:q} --llama-bin "$(dirname {input.lib:q})" --min-agreement {params.min_agreement}'
        " {params.gate:q} --max-new-tokens {params.max_new_tokens} --prompts {params.prompts} --threads {threads}"
        " --out {output:q} > {log:q} 2>&1"


# The report's "base {qtype} + runtime LoRA" stage, beside "merged then {qtype}"


rule eval_kl_divergence_lora:
    input:
        gguf=catalogue.gguf("{model}", "{qtype}", catalogue.BASE),
        loras=get_adapter_ggufs,
        logits=catalogue.report("{model}", "f16-logits.kld"),
        perplexity=f"{SPEC.llama_bin}/llama-perplexity",
    output:
        catalogue.figure("{model}", "runtime_lora", "{qtype}-kl"),
    log:
        "logs/{model}/eval_kl_divergence_lora_{qtype}.log",
    benchmark:
        "logs/benchmarks/{model}/eval_kl_divergence_lora_{qtype}.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        ctx=SPEC.eval["ctx"],
        loras=get_lora_args,
    shell:
        "python -m scripts.eval_kl_divergence --gguf {input.gguf:q} {params.loras:q}"
        ' --llama-bin "$(dirname {input.perplexity:q})" --logits {input.logits:q} --ctx-size {params.ctx}'
        " --stage base-{wildcards.qtype}+lora --out {output:q} --threads {threads} > {log:q} 2>&1"


rule eval_task_lora:
    input:
        gguf=catalogue.gguf("{model}", "{qtype}", catalogue.BASE),
        loras=get_adapter_ggufs,
        task=get_heldout,
        tokenizer=catalogue.merged("{model}"),
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        catalogue.figure("{model}", "runtime_lora", "{qtype}-task"),
    log:
        "logs/{model}/eval_task_lora_{qtype}.log",
    benchmark:
        "logs/benchmarks/{model}/eval_task_lora_{qtype}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        max_new_tokens=SPEC.eval["max_new_tokens"],
        loras=get_lora_args,
    shell:
        "python -m scripts.eval_task --gguf {input.gguf:q} {params.loras:q} --merged {input.tokenizer:q}"
        ' --heldout {input.task:q} --llama-bin "$(dirname {input.lib:q})" --max-new-tokens {params.max_new_tokens}'
        " --stage base-{wildcards.qtype}+lora --out {output:q} --threads {threads} > {log:q} 2>&1"


rule bench_runtime_lora:
    input:
        gguf=catalogue.gguf("{model}", "{qtype}"),
        base=catalogue.gguf("{model}", "{qtype}", catalogue.BASE),
        loras=get_adapter_ggufs,
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        catalogue.figure("{model}", "runtime_lora", "{qtype}-speed"),
    log:
        "logs/{model}/bench_runtime_lora_{qtype}.log",
    benchmark:
        "logs/benchmarks/{model}/bench_runtime_lora_{qtype}.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    # all cores, so no other job runs beside the measurement and skews it
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        threads=max(SIZING.bench_threads()),
        prompt_tokens=SPEC.eval["bench"]["prompt_tokens"],
        gen_tokens=SPEC.eval["bench"]["gen_tokens"],
        rounds=SPEC.eval["bench"]["repetitions"],
        loras=get_lora_args,
    shell:
        "python -m scripts.bench_runtime_lora --gguf {input.gguf:q} --base {input.base:q} {params.loras:q}"
        ' --llama-bin "$(dirname {input.lib:q})" --threads {params.threads} --prompt-tokens {params.prompt_tokens}'
        " --gen-tokens {params.gen_tokens} --rounds {params.rounds} --out {output:q} > {log:q} 2>&1"
