rule quantize:
    input:
        gguf="results/{model}/ggml-model-f16.gguf",
        tools=get_llama_tools(),
    output:
        "results/{model}/ggml-model-{qtype}.gguf",
    log:
        "logs/{model}/quantize_{qtype}.log",
    benchmark:
        "benchmarks/{model}/quantize_{qtype}.tsv"
    params:
        bin=get_llama_bin(),
    threads: workflow.cores
    resources:
        mem_mb=2000,
    shell:
        "python -m scripts.quantize --bin {params.bin} --in {input.gguf} --out {output} --type {wildcards.qtype}"
        " --threads {threads} > {log} 2>&1"
