rule fetch_llama_cpp:
    output:
        directory(SPEC.llama_source),
    log:
        "logs/llama_cpp/fetch_llama_cpp.log",
    benchmark:
        "logs/benchmarks/llama_cpp/fetch_llama_cpp.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        kind=SPEC.llama["source"],
        commit=SPEC.commit,
        args=SPEC.fetch_args,
    shell:
        "python -m scripts.fetch_llama_cpp --kind {params.kind} --commit {params.commit} {params.args:q}"
        " --out {output:q} > {log:q} 2>&1"


rule build_llama_cpp:
    input:
        SPEC.llama_source,
    output:
        SPEC.llama_tools,
    log:
        "logs/llama_cpp/build_llama_cpp.log",
    benchmark:
        "logs/benchmarks/llama_cpp/build_llama_cpp.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: 32
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        flavour=SPEC.llama["cpu"],
    shell:
        "python -m scripts.build_llama_cpp --source {input:q} --flavour {params.flavour} --threads {threads}"
        " > {log:q} 2>&1"


# llama-server's chat page, which scripts.serve serves at / (cpuforge.llama.webui)
rule build_webui:
    input:
        SPEC.llama_source,
    output:
        directory(SPEC.webui),
    log:
        "logs/llama_cpp/build_webui.log",
    benchmark:
        "logs/benchmarks/llama_cpp/build_webui.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: 2
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    shell:
        "python -m scripts.build_webui --source {input:q} --out {output:q} > {log:q} 2>&1"


# the read-only kernel generation's speed is measured against (cpuforge.evaluate.bandwidth)
rule build_read_bandwidth:
    input:
        workflow.source_path("../cpuforge/evaluate/read_bandwidth.c"),
    output:
        SPEC.read_bandwidth,
    log:
        "logs/llama_cpp/build_read_bandwidth.log",
    benchmark:
        "logs/benchmarks/llama_cpp/build_read_bandwidth.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: 1
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    shell:
        "python -m scripts.build_read_bandwidth --out {output:q} > {log:q} 2>&1"
