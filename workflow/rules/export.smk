# Export: GGUF files with llama.cpp's own converter and quantizer, each loaded back and checked.


rule quantize:
    """Convert to F16 GGUF with the training chat template embedded, quantize, load each file in llama.cpp; an Ollama Modelfile beside each."""
    input:
        model=tuned_source,
        eval=eval_texts_input,
    output:
        gguf=directory(f"{RESULTS}/{{recipe}}/{{variant}}/gguf"),
    params:
        code=stage_code("quantize"),
        section=stage_params("quantize", "pretrain", "format"),
    log:
        "logs/{recipe}/{variant}/quantize.log",
    benchmark:
        "benchmarks/{recipe}/{variant}/quantize.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule cards:
    """A model card for the adapter, the merged model and the GGUFs: lineage, scores base -> tuned -> GGUF, contamination, how to run."""
    input:
        adapter=rules.train.output.model,
        merged=rules.merge.output.merged,
        gguf=publish_gguf_input,
        compare=rules.evaluate.output.compare,
    output:
        cards=directory(f"{RESULTS}/{{recipe}}/{{variant}}/cards"),
    params:
        code=stage_code("cards"),
        section=stage_params("publish"),
        dataset_source=dataset_source_param,
    log:
        "logs/{recipe}/{variant}/cards.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule publish:
    """Opt-in (publish.enabled): push adapter, merged model and GGUFs to the Hub with model cards; offline it fails before any upload."""
    input:
        adapter=rules.train.output.model,
        merged=rules.merge.output.merged,
        gguf=publish_gguf_input,
        compare=rules.evaluate.output.compare,
    output:
        plan=f"{RESULTS}/{{recipe}}/{{variant}}/publish/plan.json",
    params:
        code=stage_code("publish"),
        section=stage_params("publish"),
        dataset_source=dataset_source_param,
    log:
        "logs/{recipe}/{variant}/publish.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"
