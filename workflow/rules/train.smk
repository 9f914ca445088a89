# Training: an objective (sft | dpo | kto | grpo) on a method (full | lora | qlora | unsloth), and
# merge; the pretrain-from-scratch path.
# Outputs under results/{recipe}/{variant}/ (variant 'main' unless the recipe has a sweep).


rule train:
    """Train the base model for the recipe's objective (sft, dpo, kto, grpo) with trl; resumes from the last checkpoint after a crash."""
    input:
        unpack(train_inputs),
    output:
        model=directory(f"{RESULTS}/{{recipe}}/{{variant}}/model/trained"),
        metrics=f"{RESULTS}/{{recipe}}/{{variant}}/train/metrics.json",
        loss=report(f"{RESULTS}/{{recipe}}/{{variant}}/train/loss.png", caption="../report/loss.rst", category="Training", subcategory="{recipe} {variant}"),
    params:
        code=stage_code("train"),
        section=stage_params("model", "train", train_keys="train"),
    log:
        "logs/{recipe}/{variant}/train.log",
    benchmark:
        "benchmarks/{recipe}/{variant}/train.tsv"
    threads: 2
    resources:
        gpu=train_job_gpus,
        gpu_model=gpu_model,
        mem_mb=train_mem,
        runtime=train_runtime,
        nodes=train_nodes,
        tasks=train_tasks,
        tasks_per_gpu=train_tasks_per_gpu,
        mpi=train_mpi,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule merge:
    """Merge the adapter into the 16-bit base, check logits, save bf16 safetensors + card + samples."""
    input:
        model=rules.train.output.model,
        metrics=rules.train.output.metrics,
        base=base_model_input,
        template=rules.format.output.template,
        eval=rules.format.output.eval,
        reports=data_reports_input,
    output:
        merged=directory(f"{RESULTS}/{{recipe}}/{{variant}}/model/merged"),
        samples=f"{RESULTS}/{{recipe}}/{{variant}}/merge/samples.txt",
        check=f"{RESULTS}/{{recipe}}/{{variant}}/merge/merge_check.json",
    params:
        code=stage_code("merge"),
        section=stage_params("model", "train", train_keys="merge"),
        card=stage_params("description", "dataset"),
    log:
        "logs/{recipe}/{variant}/merge.log",
    benchmark:
        "benchmarks/{recipe}/{variant}/merge.tsv"
    threads: 2
    resources:
        mem_mb=merge_mem,
        runtime=60,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule train_tokenizer:
    """Train a ByteLevel BPE tokenizer with special tokens and a chat template (kind: pretrain)."""
    input:
        corpus=corpus_input,
    output:
        tokenizer=directory(f"{RESULTS}/{{recipe}}/pretrain/tokenizer"),
    params:
        code=stage_code("train_tokenizer"),
        section=stage_params("pretrain"),
    log:
        "logs/{recipe}/train_tokenizer.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule pretrain:
    """Causal-LM training on the corpus: a Llama built from the recipe's config (from scratch), or model.base continued."""
    input:
        unpack(pretrain_input),
        corpus=corpus_input,
    output:
        model=directory(f"{RESULTS}/{{recipe}}/pretrain/model"),
        metrics=f"{RESULTS}/{{recipe}}/pretrain/metrics.json",
        loss=report(f"{RESULTS}/{{recipe}}/pretrain/loss.png", caption="../report/loss.rst", category="Training", subcategory="{recipe} pretrain"),
    params:
        code=stage_code("pretrain"),
        section=stage_params("pretrain", "model", "train", train_keys="train"),
    log:
        "logs/{recipe}/pretrain.log",
    benchmark:
        "benchmarks/{recipe}/pretrain.tsv"
    threads: 2
    resources:
        gpu=train_gpus,
        mem_mb=train_mem,
        runtime=train_runtime,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"
