# Evaluation with lm-eval: the base model once per recipe, each tuned variant (and its GGUFs).


rule evaluate_base:
    """Score the base model on the recipe's tasks (shared by every sweep variant)."""
    input:
        base=base_model_input,
        eval=rules.format.output.eval,
        template=rules.format.output.template,
        task_data=eval_data_input,
    output:
        scores=f"{RESULTS}/{{recipe}}/eval_base/base.json",
    params:
        code=stage_code("evaluate_base"),
        section=stage_params("evaluate", "model"),
    log:
        "logs/{recipe}/evaluate_base.log",
    benchmark:
        "benchmarks/{recipe}/evaluate_base.tsv"
    threads: 2
    resources:
        gpu=train_gpus,
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule evaluate:
    """Score the tuned model (and the quantized GGUFs) on the same tasks; write the before/after comparison."""
    input:
        tuned=tuned_source,
        base_scores=rules.evaluate_base.output.scores,
        contamination=rules.decontaminate.output.report,
        upstream=upstream_compare_input,
        eval=rules.format.output.eval,
        template=rules.format.output.template,
        gguf=gguf_input,
        task_data=eval_data_input,
    output:
        scores=f"{RESULTS}/{{recipe}}/{{variant}}/eval/tuned.json",
        compare=report(f"{RESULTS}/{{recipe}}/{{variant}}/eval/compare.json", caption="../report/compare.rst", category="Evaluation", subcategory="{recipe} {variant}"),
        plot=report(f"{RESULTS}/{{recipe}}/{{variant}}/eval/compare.png", caption="../report/compare.rst", category="Evaluation", subcategory="{recipe} {variant}"),
    params:
        code=stage_code("evaluate"),
        section=stage_params("evaluate", "model"),
    log:
        "logs/{recipe}/{variant}/evaluate.log",
    benchmark:
        "benchmarks/{recipe}/{variant}/evaluate.tsv"
    threads: 2
    resources:
        gpu=train_gpus,
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"
