rule make_eval_text:
    input:
        unpack(get_eval_text_input),
    output:
        catalogue.report("{model}", "eval_text.txt"),
    log:
        "logs/{model}/make_eval_text.log",
    benchmark:
        "logs/benchmarks/{model}/make_eval_text.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        text=SPEC.eval["text"],
        task=get_task_arg,
    shell:
        "python -m scripts.make_eval_text --text {params.text:q} {params.task:q} --out {output:q} > {log:q} 2>&1"


rule eval_perplexity_hf:
    input:
        unpack(get_hf_stage_input),
        text=catalogue.report("{model}", "eval_text.txt"),
        vocab=catalogue.gguf("{model}", "f16"),
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        catalogue.figure("{model}", "perplexity", "{hf_stage}"),
    log:
        "logs/{model}/eval_perplexity_{hf_stage}.log",
    benchmark:
        "logs/benchmarks/{model}/eval_perplexity_{hf_stage}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        model=get_hf_stage_model,
        ctx=SPEC.eval["ctx"],
        chunks=SPEC.eval["chunks"],
    shell:
        "python -m scripts.eval_perplexity --hf {params.model:q} --vocab {input.vocab:q} --text {input.text:q}"
        ' --llama-bin "$(dirname {input.lib:q})" --ctx-size {params.ctx} --chunks {params.chunks}'
        " --stage {wildcards.hf_stage}"
        " --out {output:q}"
        " --threads {threads} > {log:q} 2>&1"


rule eval_perplexity:
    input:
        gguf=catalogue.gguf("{model}", "f16"),
        text=catalogue.report("{model}", "eval_text.txt"),
        perplexity=f"{SPEC.llama_bin}/llama-perplexity",
    output:
        json=catalogue.figure("{model}", "perplexity", "f16"),
        # f16's log-probabilities, which every quant is compared with; large (windows x vocab)
        logits=temp(catalogue.report("{model}", "f16-logits.kld")),
    log:
        "logs/{model}/eval_perplexity_f16.log",
    benchmark:
        "logs/benchmarks/{model}/eval_perplexity_f16.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        ctx=SPEC.eval["ctx"],
        chunks=SPEC.eval["chunks"],
    shell:
        'python -m scripts.eval_perplexity --gguf {input.gguf:q} --llama-bin "$(dirname {input.perplexity:q})"'
        " --text {input.text:q} --ctx-size {params.ctx} --chunks {params.chunks} --stage f16"
        " --save-logits {output.logits:q} --out {output.json:q}"
        " --threads {threads} > {log:q} 2>&1"


rule eval_kl_divergence:
    input:
        gguf=catalogue.gguf("{model}", "{gguf_stage}"),
        logits=catalogue.report("{model}", "f16-logits.kld"),
        perplexity=f"{SPEC.llama_bin}/llama-perplexity",
    output:
        catalogue.figure("{model}", "kl_divergence", "{gguf_stage}"),
    log:
        "logs/{model}/eval_kl_divergence_{gguf_stage}.log",
    benchmark:
        "logs/benchmarks/{model}/eval_kl_divergence_{gguf_stage}.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        ctx=SPEC.eval["ctx"],
    shell:
        'python -m scripts.eval_kl_divergence --gguf {input.gguf:q} --llama-bin "$(dirname {input.perplexity:q})"'
        " --logits {input.logits:q} --ctx-size {params.ctx} --stage {wildcards.gguf_stage} --out {output:q}"
        " --threads {threads} > {log:q} 2>&1"


rule eval_task_hf:
    input:
        unpack(get_hf_stage_input),
        task=get_heldout,
        tokenizer=catalogue.merged("{model}"),
    output:
        catalogue.figure("{model}", "task", "{hf_stage}"),
    log:
        "logs/{model}/eval_task_{hf_stage}.log",
    benchmark:
        "logs/benchmarks/{model}/eval_task_{hf_stage}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        model=get_hf_stage_model,
        max_new_tokens=SPEC.eval["max_new_tokens"],
    shell:
        "python -m scripts.eval_task --hf {params.model:q} --merged {input.tokenizer:q} --heldout {input.task:q}"
        " --max-new-tokens {params.max_new_tokens} --stage {wildcards.hf_stage} --out {output:q}"
        " --threads {threads} > {log:q} 2>&1"


rule eval_task:
    input:
        gguf=catalogue.gguf("{model}", "{gguf_stage}"),
        task=get_heldout,
        tokenizer=catalogue.merged("{model}"),
        lib=f"{SPEC.llama_bin}/libllama.so",
    output:
        catalogue.figure("{model}", "task", "{gguf_stage}"),
    log:
        "logs/{model}/eval_task_{gguf_stage}.log",
    benchmark:
        "logs/benchmarks/{model}/eval_task_{gguf_stage}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        max_new_tokens=SPEC.eval["max_new_tokens"],
    shell:
        "python -m scripts.eval_task --gguf {input.gguf:q} --merged {input.tokenizer:q} --heldout {input.task:q}"
        ' --llama-bin "$(dirname {input.lib:q})" --max-new-tokens {params.max_new_tokens} --stage {wildcards.gguf_stage}'
        " --out {output:q}"
        " --threads {threads} > {log:q} 2>&1"


rule bench_threads:
    input:
        gguf=catalogue.gguf("{model}", "{gguf_stage}"),
        bench=f"{SPEC.llama_bin}/llama-bench",
        read_bandwidth=SPEC.read_bandwidth,
    output:
        catalogue.figure("{model}", "bench", "{gguf_stage}"),
    log:
        "logs/{model}/bench_threads_{gguf_stage}.log",
    benchmark:
        "logs/benchmarks/{model}/bench_threads_{gguf_stage}.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    # all cores, so no other job runs beside the sweep and skews it
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        threads=",".join(map(str, SIZING.bench_threads())),
        prompt_tokens=SPEC.eval["bench"]["prompt_tokens"],
        gen_tokens=SPEC.eval["bench"]["gen_tokens"],
        repetitions=SPEC.eval["bench"]["repetitions"],
        tolerance=SPEC.eval["bench"]["tolerance_pct"],
        read_mib=SPEC.eval["bench"]["read_mib"],
    shell:
        'python -m scripts.bench_threads --llama-bin "$(dirname {input.bench:q})" --gguf {input.gguf:q}'
        " --sweep {params.threads} --read-bandwidth {input.read_bandwidth:q} --read-mib {params.read_mib}"
        " --prompt-tokens {params.prompt_tokens} --gen-tokens {params.gen_tokens}"
        " --repetitions {params.repetitions} --tolerance-pct {params.tolerance} --stage {wildcards.gguf_stage}"
        " --out {output:q} > {log:q} 2>&1"


# draftless speculative decoding against plain decoding, on the task's prompts (cpuforge.evaluate.speculation)
rule eval_speculation:
    input:
        gguf=catalogue.gguf("{model}", "{gguf_stage}"),
        task=get_heldout,
        tokenizer=catalogue.merged("{model}"),
        bench=catalogue.figure("{model}", "bench", "{gguf_stage}"),
        server=f"{SPEC.llama_bin}/llama-server",
    output:
        catalogue.figure("{model}", "speculation", "{gguf_stage}"),
    log:
        "logs/{model}/eval_speculation_{gguf_stage}.log",
    benchmark:
        "logs/benchmarks/{model}/eval_speculation_{gguf_stage}.tsv"
    conda:
        "../envs/torch.yaml"
    # all cores, so no other job runs beside the timing and skews it
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        max_new_tokens=SPEC.eval["max_new_tokens"],
        rounds=SPEC.eval["speculation"]["rounds"],
        tolerance=SPEC.eval["bench"]["tolerance_pct"],
    shell:
        'python -m scripts.eval_speculation --llama-bin "$(dirname {input.server:q})" --gguf {input.gguf:q}'
        " --merged {input.tokenizer:q} --heldout {input.task:q} --bench {input.bench:q}"
        " --max-new-tokens {params.max_new_tokens} --rounds {params.rounds} --tolerance-pct {params.tolerance}"
        " --stage {wildcards.gguf_stage} --out {output:q} > {log:q} 2>&1"


rule make_eval_report:
    input:
        unpack(get_report_input),
    output:
        html=report(
            catalogue.report("{model}", "report.html"),
            caption="../report/report.rst",
            category="Evaluation",
            labels={"model": "{model}", "figure": "report"},
        ),
        metrics=catalogue.report("{model}", "metrics.json"),
        throughput=report(
            catalogue.report("{model}", "plots/throughput.png"),
            caption="../report/throughput.rst",
            category="Evaluation",
            labels={"model": "{model}", "figure": "tokens/s vs threads"},
        ),
        size=report(
            catalogue.report("{model}", "plots/size_vs_perplexity.png"),
            caption="../report/size_vs_perplexity.rst",
            category="Evaluation",
            labels={"model": "{model}", "figure": "size vs perplexity"},
        ),
        accuracy=report(
            catalogue.report("{model}", "plots/accuracy.png"),
            caption="../report/accuracy.rst",
            category="Evaluation",
            labels={"model": "{model}", "figure": "task accuracy"},
        ),
        frontier=report(
            catalogue.report("{model}", "plots/frontier.png"),
            caption="../report/frontier.rst",
            category="Evaluation",
            labels={"model": "{model}", "figure": "quant search frontier"},
        ),
    log:
        "logs/{model}/make_eval_report.log",
    benchmark:
        "logs/benchmarks/{model}/make_eval_report.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        stages=get_report_args,
        runtime_lora=get_runtime_lora_args,
        auto_search=get_auto_search_arg,
        figures=catalogue.report("{model}"),
        task=get_report_task_flag,
        serve=SPEC.quant_types[0],
        commit=SPEC.commit,
        gate=SPEC.gate_words,
    shell:
        "python -m scripts.make_eval_report --model-name {wildcards.model} {params.stages:q} {params.runtime_lora:q}"
        " {params.auto_search:q}"
        " --figures {params.figures:q}"
        " {params.task:q} --checks {input.checks:q} --serve {params.serve} --llama-cpp-commit {params.commit}"
        " --gate {params.gate:q} --html {output.html:q} --metrics {output.metrics:q}"
        " --plots {output.throughput:q} {output.size:q} {output.accuracy:q} {output.frontier:q} > {log:q} 2>&1"


rule check_quality_gate:
    input:
        catalogue.report("{model}", "metrics.json"),
    output:
        catalogue.report("{model}", "quality_gate.txt"),
    log:
        "logs/{model}/check_quality_gate.log",
    benchmark:
        "logs/benchmarks/{model}/check_quality_gate.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    # the verdict also goes to snakemake's own output, so a failing gate is read where it fails
    shell:
        "python -m scripts.check_quality_gate --metrics {input:q} --out {output:q} 2>&1 | tee {log:q}"
