rule make_demo_base:
    output:
        directory(DEMO_BASE),
    log:
        "logs/demo/make_demo_base.log",
    benchmark:
        "logs/benchmarks/demo/make_demo_base.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    shell:
        "python -m scripts.make_demo_base --out {output:q} --threads {threads} > {log:q} 2>&1"


rule train_demo_adapter:
    input:
        base=DEMO_BASE,
        train=workflow.source_path("../data/demo_task/train.jsonl"),
        heldout=workflow.source_path("../data/demo_task/heldout.jsonl"),
    output:
        directory(DEMO_ADAPTER),
    log:
        "logs/demo/train_demo_adapter.log",
    benchmark:
        "logs/benchmarks/demo/train_demo_adapter.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        **SPEC.demo,
    shell:
        "python -m scripts.train_demo_adapter --base {input.base:q} --out {output:q} --steps {params.steps}"
        " --batch-size {params.batch_size} --lr {params.lr} --rank {params.rank} --alpha {params.alpha}"
        " --seed {params.seed} --threads {threads} > {log:q} 2>&1"
