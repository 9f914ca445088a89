# tunesmith: recipe -> curated data -> fine-tuned, evaluated, quantized model, tracked in MLflow.
# Run:  snakemake --cores 1 --resources gpu=1      (see README.md)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
# Declared so that Snakemake forwards them to jobs on other nodes (SLURM): every stage of one
# invocation then finds the same MLflow parent run.
envvars:
    "TUNESMITH_INVOCATION",
    "TUNESMITH_TRACKING_URI",
    "TUNESMITH_TRACKING",
    "TUNESMITH_TRACKING_TIMEOUT",
    "TUNESMITH_TRACKING_WRITER",
    "TUNESMITH_RESULTS",
    "TUNESMITH_OFFLINE",


wildcard_constraints:
    recipe="|".join(RECIPES) or "NONE",
    variant="[A-Za-z0-9._=-]+",


include: "workflow/rules/data.smk"
include: "workflow/rules/pairs.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/compare.smk"


rule all:
    input:
        final_targets(),
        compare_targets(),
    default_target: True


onstart:
    start_tracking()


onsuccess:
    close_tracking("FINISHED")


onerror:
    close_tracking("FAILED")
