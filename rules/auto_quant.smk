# The quant search (cpuforge.autoquant): how much each tensor loses in each type, measured on the model's
# own data, then the file to ship among the uniform, listed and searched candidates, each verified end to end.


rule measure_sensitivity:
    input:
        unpack(get_sensitivity_input),
    output:
        catalogue.auto("{model}", "sensitivity.tsv"),
    log:
        "logs/{model}/measure_sensitivity.log",
    benchmark:
        "logs/benchmarks/{model}/measure_sensitivity.tsv"
    conda:
        "../envs/llama_cpp.yaml"
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        imatrix=get_auto_imatrix_arg,
        types=SPEC.auto_types,
        sample_weights=SPEC.auto_quant["sample_weights"],
    shell:
        'python -m scripts.measure_sensitivity --llama-bin "$(dirname {input.lib:q})" --gguf {input.gguf:q}'
        " {params.imatrix:q} --types {params.types:q} --sample-weights {params.sample_weights}"
        " --threads {threads} --out {output:q} > {log:q} 2>&1"


rule auto_quant_search:
    input:
        unpack(get_sensitivity_input),
        sensitivity=catalogue.auto("{model}", "sensitivity.tsv"),
        logits=catalogue.report("{model}", "f16-logits.kld"),
        merged=catalogue.merged("{model}"),
        task=get_heldout,
        reference=get_reference_answers,
        listed=get_listed_ggufs,
        perplexity=f"{SPEC.llama_bin}/llama-perplexity",
        quantize=f"{SPEC.llama_bin}/llama-quantize",
        bench=f"{SPEC.llama_bin}/llama-bench",
    output:
        gguf=catalogue.gguf("{model}", AUTO),
        recipe=catalogue.auto("{model}", "recipe.txt"),
        record=catalogue.auto("{model}", "search.json"),
    log:
        "logs/{model}/auto_quant_search.log",
    benchmark:
        "logs/benchmarks/{model}/auto_quant_search.tsv"
    conda:
        "../envs/torch.yaml"
    threads: workflow.cores
    resources:
        mem_mb=SIZING.mem_mb,
        disk_mb=SIZING.disk_mb,
        runtime=SIZING.runtime,
    params:
        imatrix=get_auto_imatrix_arg,
        heldout=get_heldout_arg,
        reference=get_reference_arg,
        objective=SPEC.auto_objective_args,
        types=SPEC.auto_types,
        gate=SPEC.gate_words,
        budget=SPEC.auto_quant["budget"],
        gen_tokens=SPEC.auto_quant["gen_tokens"],
        repetitions=SPEC.eval["bench"]["repetitions"],
        tolerance=SPEC.eval["bench"]["tolerance_pct"],
        ctx=SPEC.eval["ctx"],
        max_new_tokens=SPEC.eval["max_new_tokens"],
    shell:
        'python -m scripts.auto_quant --llama-bin "$(dirname {input.lib:q})" --gguf {input.gguf:q}'
        " --sensitivity {input.sensitivity:q} {params.imatrix:q} --logits {input.logits:q} --ctx-size {params.ctx}"
        " --merged {input.merged:q} {params.heldout:q} {params.reference:q} --max-new-tokens {params.max_new_tokens}"
        " --types {params.types:q} --listed {input.listed:q} --gate {params.gate:q} --budget {params.budget}"
        " {params.objective:q} --tolerance-pct {params.tolerance} --gen-tokens {params.gen_tokens}"
        " --repetitions {params.repetitions}"
        " --out {output.gguf:q} --recipe {output.recipe:q} --record {output.record:q}"
        " --threads {threads} > {log:q} 2>&1"
        # the sentence of a search that found nothing passing, where the run fails, not only in its log
        " || {{ tail -n 1 {log:q} >&2; false; }}"
