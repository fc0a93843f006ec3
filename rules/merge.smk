# the pinned converter must read the tokenizer the merged model will carry: checked in seconds, before the merge
rule check_converter_vocab:
    input:
        unpack(get_vocab_check_input),
        source=SPEC.llama_source,
    output:
        catalogue.check("{model}", "converter-vocab"),
    log:
        "logs/{model}/check_converter_vocab.log",
    benchmark:
        "logs/benchmarks/{model}/check_converter_vocab.tsv"
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
    # the verdict also goes to snakemake's own output, so a tokenizer the converter refuses is read where it fails
    shell:
        "python -m scripts.check_converter_vocab --source {input.source:q} --base {params.base:q} {params.adapters:q}"
        " --out {output:q} 2>&1 | tee {log:q}"


rule merge:
    input:
        unpack(get_merge_input),
    output:
        directory(catalogue.merged("{model}")),
    log:
        "logs/{model}/merge.log",
    benchmark:
        "logs/benchmarks/{model}/merge.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        base=get_base,
        adapters=get_adapter_args,
        dtype=SPEC.merge["dtype"],
        verify="--verify" if SPEC.merge["verify"] else "",
    shell:
        "python -m scripts.merge --base {params.base:q} {params.adapters:q} --out {output:q}"
        " --dtype {params.dtype} {params.verify} --threads {threads} > {log:q} 2>&1"
