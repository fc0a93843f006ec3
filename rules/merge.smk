rule merge:
    input:
        unpack(get_merge_input),
    output:
        directory("results/{model}/merged"),
    log:
        "logs/{model}/merge.log",
    benchmark:
        "benchmarks/{model}/merge.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=get_merge_mem_mb,
        runtime=get_merge_runtime,
    params:
        base=get_base,
        adapters=get_adapter_args,
        dtype=config["merge"]["dtype"],
        verify="--verify" if config["merge"]["verify"] else "",
    shell:
        "python -m scripts.merge --base {params.base:q} {params.adapters:q} --out {output:q}"
        " --dtype {params.dtype} {params.verify} --threads {threads} > {log:q} 2>&1"
