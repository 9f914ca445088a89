# Data curation: download -> tokenize_count -> filter -> dedupe -> select -> decontaminate -> format.
# All CPU rules; outputs under results/{recipe}/data/. With dataset.shards N > 1 the per-row work
# scatters into N jobs of each *_shard rule (rows [a, b) of shard i: tunesmith.data.batches.shard_bounds),
# gathered by the next stage: tokenize_shard -> tokenize_count, filter_shard -> filter (rows, drops)
# and dedupe (row digests), embed_shard -> dedupe; with dedupe.method minhash or auto,
# minhash_shard (signatures) -> minhash_buckets (one job per band group) -> minhash_cluster -> dedupe.
# N = 1: no shard job, the DAG of an unsharded run.


rule prepare_model:
    """Bring a base model to resources/models/<slug> as safetensors (hub snapshot, local dir, or a GGUF converted once)."""
    input:
        source=prepare_model_input,
    output:
        model=directory("resources/models/{model}"),
    params:
        code=stage_code("prepare_model"),
        model=prepare_model_params,
    log:
        "logs/models/{model}.log",
    benchmark:
        "benchmarks/models/{model}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule download:
    """Read the dataset (local file, URL or hub id) and map its columns onto canonical rows."""
    input:
        dataset=dataset_input,
    output:
        raw=f"{RESULTS}/{{recipe}}/data/raw.parquet",
        source=f"{RESULTS}/{{recipe}}/data/source.json",
    params:
        code=stage_code("download"),
        section=stage_params("dataset"),
    log:
        "logs/{recipe}/download.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule tokenize_shard:
    """Count the tokens of shard {shard} of {shards} contiguous slices of raw.parquet (dataset.shards > 1)."""
    input:
        raw=rules.download.output.raw,
        tokenizer=tokenizer_input,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        counts=f"{RESULTS}/{{recipe}}/data/token_counts/{{shard}}-of-{{shards}}.parquet",
    wildcard_constraints:
        shard=r"\d+",
        shards=r"\d+",
    params:
        code=stage_code("tokenize_shard"),
        section=stage_params("tokenize"),
    log:
        "logs/{recipe}/tokenize_shard/{shard}-of-{shards}.log",
    benchmark:
        "benchmarks/{recipe}/tokenize_shard/{shard}-of-{shards}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule tokenize_count:
    """Count instruction, output and combined tokens with the model's fast tokenizer, in batches
    (dataset.shards > 1: gather the tokenize_shard counts)."""
    input:
        raw=rules.download.output.raw,
        tokenizer=tokenizer_input,
        shards=token_shards,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        counts=f"{RESULTS}/{{recipe}}/data/token_counts.parquet",
        stats=f"{RESULTS}/{{recipe}}/data/token_stats.json",
        hist=report(f"{RESULTS}/{{recipe}}/data/token_hist.png", caption="../report/token_hist.rst", category="Data", subcategory="{recipe}"),
    params:
        code=stage_code("tokenize_count"),
        section=stage_params("tokenize"),
    log:
        "logs/{recipe}/tokenize_count.log",
    benchmark:
        "benchmarks/{recipe}/tokenize_count.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule filter_shard:
    """Filter shard {shard} of {shards} contiguous slices of raw.parquet and hash its kept rows for exact dedupe."""
    input:
        raw=rules.download.output.raw,
        counts=rules.tokenize_shard.output.counts,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        # a copy of its slice of filtered.parquet: deleted once filter gathered it (the digests and
        # report stay, and nothing reruns a shard for its rows alone: a change to filter reruns both)
        filtered=temp(f"{RESULTS}/{{recipe}}/data/filtered/{{shard}}-of-{{shards}}.parquet"),
        report=f"{RESULTS}/{{recipe}}/data/filtered/{{shard}}-of-{{shards}}.report.json",
        digests=f"{RESULTS}/{{recipe}}/data/filtered/{{shard}}-of-{{shards}}.digests.npz",
    wildcard_constraints:
        shard=r"\d+",
        shards=r"\d+",
    params:
        code=stage_code("filter_shard"),
        section=stage_params("filter"),
    log:
        "logs/{recipe}/filter_shard/{shard}-of-{shards}.log",
    benchmark:
        "benchmarks/{recipe}/filter_shard/{shard}-of-{shards}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule filter:
    """Drop empty, too short, too long and regex-matched rows; count every drop by reason
    (dataset.shards > 1: gather the filter_shard rows and drops)."""
    input:
        raw=rules.download.output.raw,
        counts=rules.tokenize_count.output.counts,
        shards=filter_shards,
        shard_reports=filter_shard_reports,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        filtered=f"{RESULTS}/{{recipe}}/data/filtered.parquet",
        report=f"{RESULTS}/{{recipe}}/data/filter_report.json",
    params:
        code=stage_code("filter"),
        section=stage_params("filter"),
    log:
        "logs/{recipe}/filter.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule embed_shard:
    """Embed shard {shard} of {shards} contiguous slices of the rows near-dedupe compares (after exact dedupe)."""
    input:
        filtered=rules.filter.output.filtered,
        digests=dedupe_digests,  # exact dedupe's row digests, hashed by the filter shards
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        embeddings=f"{RESULTS}/{{recipe}}/data/embeddings/{{shard}}-of-{{shards}}.npz",
    wildcard_constraints:
        shard=r"\d+",
        shards=r"\d+",
    params:
        code=stage_code("embed_shard"),
        section=embed_shard_params,
    log:
        "logs/{recipe}/embed_shard/{shard}-of-{shards}.log",
    benchmark:
        "benchmarks/{recipe}/embed_shard/{shard}-of-{shards}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule minhash_shard:
    """MinHash signatures of shard {shard} of {shards} contiguous slices of filtered.parquet (dedupe.method minhash or auto)."""
    input:
        filtered=rules.filter.output.filtered,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        signatures=f"{RESULTS}/{{recipe}}/data/minhash/signatures/{{shard}}-of-{{shards}}.npz",
    wildcard_constraints:
        shard=r"\d+",
        shards=r"\d+",
    params:
        code=stage_code("minhash_shard"),
        section=minhash_params,
    log:
        "logs/{recipe}/minhash_shard/{shard}-of-{shards}.log",
    benchmark:
        "benchmarks/{recipe}/minhash_shard/{shard}-of-{shards}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule minhash_buckets:
    """LSH buckets of band group {shard} of {shards} over every shard's signatures: candidate near-duplicate pairs
    (the wildcards name the band group: as many groups as dataset.shards, at most one per band)."""
    input:
        filtered=rules.filter.output.filtered,
        signatures=minhash_signatures,
        digests=dedupe_digests,  # exact duplicates stay out of the buckets
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        pairs=f"{RESULTS}/{{recipe}}/data/minhash/buckets/{{shard}}-of-{{shards}}.npz",
    wildcard_constraints:
        shard=r"\d+",
        shards=r"\d+",
    params:
        code=stage_code("minhash_buckets"),
        section=minhash_params,
    log:
        "logs/{recipe}/minhash_buckets/{shard}-of-{shards}.log",
    benchmark:
        "benchmarks/{recipe}/minhash_buckets/{shard}-of-{shards}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule minhash_cluster:
    """Check the candidate pairs on whole signatures, join them into clusters (union-find), keep each cluster's first row."""
    input:
        filtered=rules.filter.output.filtered,
        signatures=minhash_signatures,
        buckets=minhash_buckets,
        digests=dedupe_digests,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        clusters=f"{RESULTS}/{{recipe}}/data/minhash/clusters.npz",
    params:
        code=stage_code("minhash_cluster"),
        section=minhash_params,
    log:
        "logs/{recipe}/minhash_cluster.log",
    benchmark:
        "benchmarks/{recipe}/minhash_cluster.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule dedupe:
    """Exact then near-duplicate removal: sentence-transformers embeddings + faiss inner product, or the MinHash clusters (dedupe.method)."""
    input:
        filtered=rules.filter.output.filtered,
        embeddings=dedupe_embeddings,
        clusters=dedupe_clusters,
        digests=dedupe_digests,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        deduped=f"{RESULTS}/{{recipe}}/data/deduped.parquet",
        report=f"{RESULTS}/{{recipe}}/data/dedupe_report.json",
        hist=report(f"{RESULTS}/{{recipe}}/data/dedupe_sim_hist.png", caption="../report/dedupe_sim_hist.rst", category="Data", subcategory="{recipe}"),
    params:
        code=stage_code("dedupe"),
        section=stage_params("dedupe"),
    log:
        "logs/{recipe}/dedupe.log",
    benchmark:
        "benchmarks/{recipe}/dedupe.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule select:
    """Keep all rows, the top-k longest, or a seeded random k."""
    input:
        deduped=rules.dedupe.output.deduped,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        selected=f"{RESULTS}/{{recipe}}/data/selected.parquet",
        report=f"{RESULTS}/{{recipe}}/data/select_report.json",
    params:
        code=stage_code("select"),
        section=stage_params("select"),
    log:
        "logs/{recipe}/select.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule decontaminate:
    """Check curated rows against every local eval task's documents and train against held-out (n-grams, optional embeddings); drop or flag."""
    input:
        selected=rules.select.output.selected,
        documents=task_documents_input,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        kept=f"{RESULTS}/{{recipe}}/data/decontaminated.parquet",
        report=f"{RESULTS}/{{recipe}}/data/decontaminate_report.json",
    params:
        code=stage_code("decontaminate"),
        section=stage_params("decontaminate", "evaluate", "format"),
    log:
        "logs/{recipe}/decontaminate.log",
    benchmark:
        "benchmarks/{recipe}/decontaminate.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"


rule format:
    """Render prompt/completion conversations with the chosen chat template; split off a held-out set."""
    input:
        selected=rules.decontaminate.output.kept,
        tokenizer=base_model_input,
        custom_template=template_input,
        dataset=dataset_input,  # see dataset_input: a failed stage must not hide an edit
    output:
        train=f"{RESULTS}/{{recipe}}/data/train.jsonl",
        eval=f"{RESULTS}/{{recipe}}/data/eval.jsonl",
        preview=f"{RESULTS}/{{recipe}}/data/preview.txt",
        template=f"{RESULTS}/{{recipe}}/data/chat_template.jinja",
        report=f"{RESULTS}/{{recipe}}/data/format_report.json",
    params:
        code=stage_code("format"),
        section=stage_params("format", "model", "dataset"),
    log:
        "logs/{recipe}/format.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"
