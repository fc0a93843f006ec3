# cpuforge: base model + LoRA adapters -> merged HF model -> f16 GGUF -> quantized GGUF -> evaluation report.
# See README.md (targets, layout); each stage is one file under rules/, each rule one CLI under scripts/.


configfile: f"{workflow.basedir}/config.yaml"


include: "rules/common.smk"
include: "rules/llama_cpp.smk"
include: "rules/demo.smk"
include: "rules/merge.smk"
include: "rules/convert.smk"
include: "rules/quantize.smk"
include: "rules/eval.smk"
include: "rules/checks.smk"
include: "rules/adapters.smk"
include: "rules/auto_quant.smk"


# Run by Snakemake itself, never submitted to a cluster: the targets only name
# files, the download needs the internet, which compute nodes often lack, and
# the parity and vocabulary checks read only tokenizers and GGUF metadata (seconds, little memory).
localrules:
    all,
    plan,
    llama_cpp,
    merged_model,
    f16_model,
    q4_model,
    quantized,
    checks,
    eval_report,
    lora_adapters,
    auto_quant,
    fetch_llama_cpp,
    check_tokenizer,
    check_chat_template,
    check_converter_vocab,


rule all:
    input:
        SPEC.quantized(),
        SPEC.eval_reports(),
        SPEC.check_files(),
        SPEC.chat_page(),


# the tools, and the chat page llama-server serves (llama_cpp.webui)
rule llama_cpp:
    input:
        SPEC.llama_tools,
        SPEC.chat_page(),


rule merged_model:
    input:
        expand(catalogue.merged("{model}"), model=SPEC.models),


rule f16_model:
    input:
        expand(catalogue.gguf("{model}", "f16"), model=SPEC.models),


# every artifact a target builds comes with its tokenizer and chat-template parity checks, and with the chat
# page that serves it (`python -m scripts.serve`)
rule q4_model:
    input:
        expand(catalogue.gguf("{model}", "q4_0"), model=SPEC.models),
        SPEC.parity_checks(["q4_0"]),
        SPEC.chat_page(),


rule quantized:
    input:
        SPEC.quantized(),
        SPEC.parity_checks(SPEC.quant_types),


rule checks:
    input:
        SPEC.check_files(),


rule eval_report:
    input:
        SPEC.eval_reports(),


# the quant search's choice for every model: the GGUF, its recipe and the search record, with the parity
# checks; and the report, where `auto` is one of quant_types (its row and the size/quality frontier)
rule auto_quant:
    input:
        SPEC.auto_quant_files(),


# the adapters as GGUF LoRA files beside the unmerged base in every quant type, to apply at run time
rule lora_adapters:
    input:
        SPEC.lora_adapters(),


# what every job of `all` needs (peak memory, disk written, runtime), predicted from the inputs' headers;
# printed, and written to results/plan.tsv, each time it is asked for
rule plan:
    log:
        "logs/plan.log",
    params:
        tsv=catalogue.PLAN,
    run:
        sizing_dag.show_plan(workflow, SIZING, params.tsv, log[0])
