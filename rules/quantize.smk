rule make_imatrix:
    input:
        gguf=catalogue.gguf("{model}", "f16"),
        merged=catalogue.merged("{model}"),
        task=get_calibration_files,
        tool=f"{SPEC.llama_bin}/llama-imatrix",
    output:
        catalogue.imatrix("{model}"),
    log:
        "logs/{model}/make_imatrix.log",
    benchmark:
        "logs/benchmarks/{model}/make_imatrix.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 16
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        args=get_calibration_args,
        ctx_size=SPEC.imatrix["ctx_size"],
        chunks=SPEC.imatrix["chunks"],
        prose_chars=SPEC.imatrix["prose_chars"],
    shell:
        'python -m scripts.make_imatrix --llama-bin "$(dirname {input.tool:q})" --gguf {input.gguf:q} --merged {input.merged:q}'
        " {params.args:q} --prose-chars {params.prose_chars} --ctx-size {params.ctx_size} --chunks {params.chunks}"
        " --threads {threads} --out {output:q} > {log:q} 2>&1"


rule quantize:
    input:
        unpack(get_quantize_input),
    output:
        catalogue.gguf("{model}", "{qtype}"),
    log:
        "logs/{model}/quantize_{qtype}.log",
    benchmark:
        "logs/benchmarks/{model}/quantize_{qtype}.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: 16
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        imatrix=get_imatrix_arg,
    shell:
        'python -m scripts.quantize --llama-bin "$(dirname {input.quantize:q})" --gguf {input.gguf:q} --out {output:q}'
        " --type {wildcards.qtype}"
        " {params.imatrix:q} --threads {threads} > {log:q} 2>&1"


use rule quantize as quantize_base with:
    input:
        unpack(get_base_quantize_input),
    output:
        catalogue.gguf("{model}", "{qtype}", catalogue.BASE),
    log:
        "logs/{model}/quantize_base_{qtype}.log",
    benchmark:
        "logs/benchmarks/{model}/quantize_base_{qtype}.tsv"
