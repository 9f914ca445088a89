# Comparison across recipes and sweep variants, read back from MLflow (mlflow.search_runs).
# Runs after every other target of this invocation, so it sees all their stage runs; in rule all
# only when tracking is enabled (compare_targets() in common.smk). By hand, any time:
#   tunesmith compare --out results/compare [--experiments RECIPE ...]


localrules:
    compare,


rule compare:
    """Markdown + CSV + PNG comparing recipes and variants: rows per curation stage, loss, eval, GGUF, time."""
    input:
        final_targets(),
    output:
        md=f"{RESULTS}/compare/compare.md",
        csv=f"{RESULTS}/compare/compare.csv",
        png=report(f"{RESULTS}/compare/compare.png", caption="../report/compare_runs.rst", category="Comparison"),
    params:
        code=stage_code("compare"),
        experiments=list(RECIPES),
    log:
        "logs/compare.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/stage.py"
