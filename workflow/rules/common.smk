# Config and recipe loading, validation and the helpers the rules use (named functions, no lambdas).
import os
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from tunesmith import objectives, pipeline, tracking, tracking_writer
from tunesmith.settings import configure_environment
from tunesmith.errors import TunesmithError
from tunesmith.recipe import check_config, continues_pretraining, has_dataset, load_recipe, resolve_chains, upstream, variants
from tunesmith.checkpoints import stage_train_section
from tunesmith.methods import METHODS
from tunesmith.models import merge_mem_mb, model_slug


def _load_all():
    """Validate config.yaml and every named recipe before any job runs."""
    try:
        cfg = check_config(dict(config), "config.yaml (with --config/--configfile values)", files=workflow.configfiles)
        recipes = {}
        for name in cfg["recipes"]:
            path = Path(cfg["recipes_dir"]) / f"{name}.yaml"
            recipes[name] = load_recipe(path, cfg["overrides"].get(name))
        # Recipes that the named ones start from (model.base: recipe:<name>) join the workflow,
        # with their overrides; only the named ones are final targets.
        recipes = resolve_chains(recipes, cfg["recipes_dir"],
                                 lambda path, name: load_recipe(path, cfg["overrides"].get(name)))
        unknown = sorted(set(cfg["overrides"]) - set(recipes))
        if unknown:
            raise TunesmithError(f"config overrides name recipes that are not run: {', '.join(unknown)}")
    except TunesmithError as exc:
        raise WorkflowError(str(exc)) from None
    return cfg, recipes


CFG, RECIPES = _load_all()
VARIANTS = {name: variants(recipe) for name, recipe in RECIPES.items()}
RESULTS = CFG["results_dir"]
configure_environment(CFG)


def recipe_of(wildcards):
    return RECIPES[wildcards.recipe]


def variant_of(wildcards):
    return VARIANTS[wildcards.recipe][wildcards.variant]


def has_sft(recipe):
    return has_dataset(recipe)


def base_model_dir(recipe):
    """Where the model the sft chain starts from lives as safetensors: this recipe's pretrain output
    (kind: pretrain, from scratch or continued), else where model.base points."""
    if recipe["kind"] == "pretrain":
        return f"{RESULTS}/{recipe['name']}/pretrain/model"
    return start_model_dir(recipe)


def start_model_dir(recipe):
    """Where model.base lives as safetensors: resources/models/<slug>, or the merged model of the
    recipe it chains on. For continued pretraining, this is where pretraining starts."""
    link = upstream(recipe)
    if link is not None:
        return f"{RESULTS}/{link[0]}/{link[1]}/model/merged"
    return f"resources/models/{model_slug(recipe['model']['base'])}"


def base_model_input(wildcards):
    return base_model_dir(recipe_of(wildcards))


def tokenizer_input(wildcards):
    recipe = recipe_of(wildcards)
    if recipe["tokenize"]["tokenizer"]:
        return f"resources/models/{model_slug(recipe['tokenize']['tokenizer'])}"
    if continues_pretraining(recipe):  # the same tokenizer: counting need not wait for pretraining
        return start_model_dir(recipe)
    return base_model_dir(recipe)


def pretrain_input(wildcards):
    """From scratch: the tokenizer train_tokenizer wrote. Continued: the model pretraining starts from."""
    recipe = recipe_of(wildcards)
    if continues_pretraining(recipe):
        return {"base": start_model_dir(recipe)}
    return {"tokenizer": f"{RESULTS}/{wildcards.recipe}/pretrain/tokenizer"}


def model_sources():
    """slug -> source for every model a prepare_model job may need to fetch or convert."""
    out = {}
    for recipe in RECIPES.values():
        for source in (recipe["model"]["base"], recipe["tokenize"]["tokenizer"]):
            if source and source != "pretrained" and not source.startswith("recipe:"):
                out[model_slug(source)] = {
                    "source": source,
                    "revision": recipe["model"]["revision"],
                    "max_length": recipe["model"]["max_length"],
                    "trust_remote_code": recipe["model"]["trust_remote_code"],
                }
    return out


MODEL_SOURCES = model_sources()


def prepare_model_params(wildcards):
    return MODEL_SOURCES[wildcards.model]


def prepare_model_input(wildcards):
    """A local model folder or GGUF file (the built-in alias reads the installed package)."""
    return local_paths(MODEL_SOURCES[wildcards.model]["source"])


def stage_params(*sections, train_keys=None):
    """Params for a stage: only its recipe sections, so editing one section reruns only what reads it.
    train_keys ("train" or "merge"): only the train.* keys that stage reads
    (tunesmith.checkpoints.TRAIN_KEYS), so a merge-only or scheduling key reruns no training."""

    def params(wildcards):
        recipe = RECIPES[wildcards.recipe]
        if "variant" in wildcards.keys():
            recipe = VARIANTS[wildcards.recipe][wildcards.variant]
        out = {s: recipe[s] for s in sections}
        if train_keys is not None:
            out["train"] = stage_train_section(out["train"], train_keys)
        if "dataset" in out:
            # how many embedding jobs (scheduling) is no input of any stage: changing it reruns none
            out["dataset"] = {k: v for k, v in out["dataset"].items() if k != "shards"}
        return out

    return params


def stage_code(name):
    """A digest of the library code a stage runs (tunesmith.pipeline.code_digest): a changed
    digest reruns the stage and what follows. config rerun_on_code_change: false turns it off."""
    return pipeline.code_digest(name) if CFG["rerun_on_code_change"] else ""


def train_gpus(wildcards):
    recipe = variant_of(wildcards) if "variant" in wildcards.keys() else recipe_of(wildcards)
    gpus = recipe["train"]["gpus"]
    if gpus is None:
        gpus = METHODS[recipe["train"]["method"]].default_gpus
    return gpus


def train_ranks(wildcards):
    """(nodes, processes per node): one per GPU when train.gpus > 1, else train.processes (CPU)."""
    train = (variant_of(wildcards) if "variant" in wildcards.keys() else recipe_of(wildcards))["train"]
    gpus = train_gpus(wildcards)
    return train["nodes"], gpus if gpus > 1 else train["processes"]


def train_nodes(wildcards):
    nodes, _ = train_ranks(wildcards)
    return nodes if nodes > 1 else None  # None: no --nodes, as before


def train_tasks(wildcards):
    """SLURM tasks = ranks, so that the allocation holds threads x ranks CPUs (--cpus-per-task is
    per task); srun then starts one accelerate launcher per node over them (tunesmith.launch)."""
    nodes, per_node = train_ranks(wildcards)
    return nodes * per_node if nodes * per_node > 1 else None


def train_mpi(wildcards):
    """'srun' for a multi-process job: the SLURM jobstep plugin then runs the job's script without
    its own `srun -n1` wrapper, in which the trainer's srun could not start its tasks."""
    nodes, per_node = train_ranks(wildcards)
    return "srun" if nodes * per_node > 1 else None


def train_job_gpus(wildcards):
    """GPUs of the whole train job: per node x nodes (SLURM's --gpus counts the job's)."""
    nodes, _ = train_ranks(wildcards)
    return train_gpus(wildcards) * nodes


def train_tasks_per_gpu(wildcards):
    # The slurm plugin turns `tasks` into --ntasks-per-gpu on a GPU job unless this is set.
    return 1 if train_tasks(wildcards) and train_gpus(wildcards) > 1 else None


def train_mem(wildcards):
    return recipe_of(wildcards)["train"]["mem_mb"]


def merge_mem(wildcards, input):
    return merge_mem_mb(input.base)


def train_runtime(wildcards):
    return recipe_of(wildcards)["train"]["runtime"]


def gpu_model(wildcards):
    return recipe_of(wildcards)["train"]["gpu_model"] or ""


def tuned_source(wildcards):
    """What quantize and evaluate read as the tuned model: the merged SFT model, or the pretrained one."""
    recipe = recipe_of(wildcards)
    if has_sft(recipe):
        return f"{RESULTS}/{wildcards.recipe}/{wildcards.variant}/model/merged"
    return f"{RESULTS}/{wildcards.recipe}/pretrain/model"


def eval_texts_input(wildcards):
    """Held-out texts for GGUF agreement checks (none for a pretrain-only recipe: it samples its corpus)."""
    if has_sft(recipe_of(wildcards)):
        return f"{RESULTS}/{wildcards.recipe}/data/eval.jsonl"
    return []


def data_reports_input(wildcards):
    """Every data stage's row report, in stage order: the model card counts rows from them."""
    return pipeline.rows_reports(f"{RESULTS}/{wildcards.recipe}/data")


def local_paths(*candidates):
    """The candidates that are local files or folders: what a stage reads from disk is an input of
    its rule, so editing it reruns the stage and what follows (hub ids and URLs are pinned in
    the stage's report instead)."""
    return [str(c) for c in candidates if isinstance(c, str) and c and Path(c).exists()]


def dataset_input(wildcards):
    """The recipe's local dataset file: an input of download, and of every later data stage and train
    too. Snakemake deletes a job's outputs before running it and never reruns a job just because an
    input made by another job is missing: if download failed on an edited file, raw.parquet would be
    gone and the old train.jsonl would count as done. Depending on the file itself, each of them
    sees the edit."""
    dataset = recipe_of(wildcards)["dataset"]
    return local_paths(dataset["source"], *(s["source"] for s in dataset["sources"] or ()))


def template_input(wildcards):
    fmt = recipe_of(wildcards)["format"]
    return local_paths(fmt["custom_template"]) if fmt["template"] == "custom" else []


def corpus_input(wildcards):
    return local_paths(recipe_of(wildcards)["pretrain"]["corpus"]["source"])


def task_documents_input(wildcards):
    """The local files holding the documents of the recipe's eval tasks (decontaminate reads them)."""
    from tunesmith.tasks import task_documents

    return local_paths(*(str(p) for p in task_documents(recipe_of(wildcards)["evaluate"])[0].values()))


def eval_data_input(wildcards):
    """Local data files of the recipe's lm-eval tasks."""
    tasks = recipe_of(wildcards)["evaluate"]["tasks"]
    return local_paths(*(t.get("data_files") for t in tasks if isinstance(t, dict)))


def train_inputs(wildcards):
    """What train reads: the template, the base, and the files its objective declares
    (tunesmith.objectives.<name>.INPUTS: prompt/completion rows, or curated preference pairs)."""
    recipe = variant_of(wildcards)
    data = f"{RESULTS}/{wildcards.recipe}/data"
    inputs = {"template": f"{data}/chat_template.jinja", "base": base_model_dir(recipe),
              "dataset": dataset_input(wildcards)}
    for name, file in objectives.inputs(recipe["train"]["objective"]).items():
        inputs[name] = f"{data}/{file}"
    return inputs


def pairs_input(wildcards):
    """The pairs curate_pairs reads: preference.source when it is a local file (a hub id is read
    by the script itself), else the verifier's pairs."""
    source = recipe_of(wildcards)["preference"]["source"]
    if source:
        return local_paths(source)
    return f"{RESULTS}/{wildcards.recipe}/data/pairs_built.jsonl"


def upstream_compare_input(wildcards):
    """A chained recipe's comparison extends its upstream's: base -> upstream -> this recipe."""
    link = upstream(recipe_of(wildcards))
    return f"{RESULTS}/{link[0]}/{link[1]}/eval/compare.json" if link else []


def gguf_input(wildcards):
    recipe = recipe_of(wildcards)
    if recipe["quantize"]["enabled"] and recipe["evaluate"]["gguf"]:
        return f"{RESULTS}/{wildcards.recipe}/{wildcards.variant}/gguf"
    return []


def final_targets():
    out = []
    for name in CFG["recipes"]:  # recipes joined only as upstream of a chain build what it reads
        recipe = RECIPES[name]
        for variant in VARIANTS[name]:
            base = f"{RESULTS}/{name}/{variant}"
            if has_sft(recipe):
                out.append(f"{base}/merge/samples.txt")
                if recipe["evaluate"]["tasks"]:
                    out.append(f"{base}/eval/compare.json")
                    out.append(f"{base}/cards")
            else:
                out.append(f"{RESULTS}/{name}/pretrain/metrics.json")
            if recipe["quantize"]["enabled"]:
                out.append(f"{base}/gguf")
            if recipe["publish"]["enabled"] and has_sft(recipe):
                out.append(f"{base}/publish/plan.json")
    return out


def start_tracking():
    """One MLflow writer in this main process pushes every job's stage record (tunesmith.tracking)."""
    tracking_writer.start_writer(list(RECIPES), RESULTS)


def publish_gguf_input(wildcards):
    if recipe_of(wildcards)["quantize"]["enabled"]:
        return f"{RESULTS}/{wildcards.recipe}/{wildcards.variant}/gguf"
    return []


def dataset_source_param(wildcards):
    """The dataset as the Hub card names it (a hub id goes into its metadata; a local file does not)."""
    return recipe_of(wildcards)["dataset"]["source"] or ""


def close_tracking(status):
    tracking_writer.stop_writer()
    tracking_writer.close_parents(status, list(RECIPES), RESULTS)


def compare_targets():
    """Targets of the MLflow comparison when tracking is on (the all target then asks for them)."""
    if not CFG["tracking"]["enabled"]:
        return []
    return [f"{RESULTS}/compare/compare.md", f"{RESULTS}/compare/compare.csv", f"{RESULTS}/compare/compare.png"]


def embed_shard_params(wildcards):
    """The dedupe settings that change the embeddings: editing the threshold or index reruns only dedupe."""
    dedupe = recipe_of(wildcards)["dedupe"]
    return {"dedupe": {k: dedupe[k] for k in ("exact", "field", "model", "batch_size", "device")}}


def shard_files(wildcards, folder, suffix):
    """dataset.shards N > 1: the N files data/<folder>/<i>-of-<N><suffix> of the shard jobs, in shard
    order, for the job that gathers them; N = 1: none, the stage runs whole, and the DAG has no
    shard job."""
    shards = recipe_of(wildcards)["dataset"]["shards"]
    if shards <= 1:
        return []
    return [f"{RESULTS}/{wildcards.recipe}/data/{folder}/{i}-of-{shards}{suffix}" for i in range(1, shards + 1)]


def token_shards(wildcards):
    """The tokenize_shard counts tokenize_count gathers."""
    return shard_files(wildcards, "token_counts", ".parquet")


def filter_shards(wildcards):
    """The filter_shard rows filter gathers (their reports: filter_shard_reports)."""
    return shard_files(wildcards, "filtered", ".parquet")


def filter_shard_reports(wildcards):
    return shard_files(wildcards, "filtered", ".report.json")


def dedupe_digests(wildcards):
    """The filter_shard jobs' digests of their kept rows: exact dedupe hashes nothing itself."""
    return shard_files(wildcards, "filtered", ".digests.npz")


def dedupe_embeddings(wildcards):
    """dataset.shards > 1 with near-dedupe by embedding: the shard embeddings in order (gathered
    by dedupe); else none, and dedupe embeds in its own job (method auto picking embedding too)."""
    dedupe = recipe_of(wildcards)["dedupe"]
    if not dedupe["near"] or dedupe["method"] != "embedding":
        return []
    return shard_files(wildcards, "embeddings", ".npz")


def minhash_on(wildcards):
    dedupe = recipe_of(wildcards)["dedupe"]
    return dedupe["near"] and dedupe["method"] in ("minhash", "auto")


def minhash_params(wildcards):
    """The dedupe settings the MinHash jobs read."""
    dedupe = recipe_of(wildcards)["dedupe"]
    return {"dedupe": {k: dedupe[k] for k in ("exact", "field", "minhash", "sample_pairs")}}


def minhash_signatures(wildcards):
    """dataset.shards > 1, method minhash or auto: the minhash_shard signature files in order."""
    return shard_files(wildcards, "minhash/signatures", ".npz") if minhash_on(wildcards) else []


def minhash_buckets(wildcards):
    """The minhash_buckets jobs' candidate pairs: one job per band group, as many as shards (at most
    one per band)."""
    if not minhash_on(wildcards) or recipe_of(wildcards)["dataset"]["shards"] <= 1:
        return []
    groups = min(recipe_of(wildcards)["dataset"]["shards"], recipe_of(wildcards)["dedupe"]["minhash"]["bands"])
    return [f"{RESULTS}/{wildcards.recipe}/data/minhash/buckets/{g}-of-{groups}.npz" for g in range(1, groups + 1)]


def dedupe_clusters(wildcards):
    """dataset.shards > 1, method minhash or auto: minhash_cluster's clusters (dedupe applies them;
    auto may embed instead). Else none: dedupe runs MinHash in its own job when it picks it."""
    if not minhash_signatures(wildcards):
        return []
    return f"{RESULTS}/{wildcards.recipe}/data/minhash/clusters.npz"
