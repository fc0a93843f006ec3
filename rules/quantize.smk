rule quantize:
    input:
        gguf="results/{model}/ggml-model-f16.gguf",
        quantize=f"{get_llama_bin()}/llama-quantize",
    output:
        "results/{model}/ggml-model-{qtype}.gguf",
    log:
        "logs/{model}/quantize_{qtype}.log",
    benchmark:
        "benchmarks/{model}/quantize_{qtype}.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: 16
    resources:
        mem_mb=get_quantize_mem_mb,
        runtime=get_quantize_runtime,
    shell:
        "python -m scripts.quantize --quantize {input.quantize} --in {input.gguf} --out {output} --type {wildcards.qtype}"
        " --threads {threads} > {log} 2>&1"
