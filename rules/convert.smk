rule convert:
    input:
        model=catalogue.merged("{model}"),
        source=SPEC.llama_source,
    output:
        catalogue.gguf("{model}", "f16"),
    log:
        "logs/{model}/convert.log",
    benchmark:
        "logs/benchmarks/{model}/convert.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    shell:
        "python -m scripts.convert --source {input.source:q} --merged {input.model:q} --out {output:q}"
        " --outtype f16 --model-name {wildcards.model} --threads {threads} > {log:q} 2>&1"


# the unmerged base (for runtime LoRA) through the same step: its weights, the merged model's tokenizer
use rule convert as convert_base with:
    input:
        model=catalogue.unmerged("{model}"),
        source=SPEC.llama_source,
    output:
        catalogue.gguf("{model}", "f16", catalogue.BASE),
    log:
        "logs/{model}/convert_base.log",
    benchmark:
        "logs/benchmarks/{model}/convert_base.tsv"
