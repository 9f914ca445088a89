# Preference pairs for dpo and kto: built by a verifier from the model's own samples (when
# preference.source is null), then curated. Outputs under results/{recipe}/data/.


rule build_pairs:
    """Sample answers from the model being trained, score each with the verifier's reward against the row's reference, and pair a right answer with a wrong one."""
    input:
        prompts=rules.format.output.train,
        template=rules.format.output.template,
        model=base_model_input,
    output:
        pairs=f"{RESULTS}/{{recipe}}/data/pairs_built.jsonl",
        report=f"{RESULTS}/{{recipe}}/data/pairs_built.json",
    params:
        code=stage_code("build_pairs"),
        section=stage_params("preference", "model"),
    log:
        "logs/{recipe}/build_pairs.log",
    benchmark:
        "benchmarks/{recipe}/build_pairs.tsv"
    threads: 2
    resources:
        gpu=train_gpus,
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule curate_pairs:
    """Canonical pairs from any layout; drop identical chosen/rejected, over-long pairs and repeated prompts, each counted."""
    input:
        pairs=pairs_input,
        tokenizer=base_model_input,
        template=rules.format.output.template,
    output:
        pairs=f"{RESULTS}/{{recipe}}/data/pairs.jsonl",
        report=f"{RESULTS}/{{recipe}}/data/pairs_report.json",
        hist=report(f"{RESULTS}/{{recipe}}/data/pairs_tokens.png", caption="../report/token_hist.rst", category="Data", subcategory="{recipe}"),
    params:
        code=stage_code("curate_pairs"),
        section=stage_params("preference", "model"),
    log:
        "logs/{recipe}/curate_pairs.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"
