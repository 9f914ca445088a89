"""Pretrain from scratch: BPE tokenizer, a small Llama, then the SFT chain on top of it. Continued
pretraining: that model (standing in for any model.base) trained further on another corpus."""

from __future__ import annotations

import json
import random

import pytest

from tunesmith.errors import TunesmithError


def _corpus(path, n=400, seed=0):
    rng = random.Random(seed)
    subjects = "the cat|a dog|my friend|the old man|a small bird|the teacher|our neighbour".split("|")
    verbs = "sees|likes|follows|paints|finds|remembers|answers".split("|")
    objects = "the river|a red apple|the tall tree|an open window|the quiet town|a long letter".split("|")
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} in the morning."
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _section(corpus, **args):
    from tunesmith.schema import fill_defaults, load_schema

    schema = load_schema("recipe")
    pre = fill_defaults({"corpus": {"source": str(corpus)}}, schema["properties"]["pretrain"], schema)
    pre["tokenizer"]["vocab_size"] = 512
    pre["tokenizer"]["min_frequency"] = 1
    pre["model"].update({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "max_position_embeddings": 256})
    pre["args"] = fill_defaults({}, schema["$defs"]["training_args"], schema)
    pre["args"].update({"max_length": 64, "per_device_train_batch_size": 8, "max_steps": 12, "learning_rate": 3e-3,
                        "logging_steps": 2, "save_steps": 6})
    pre["args"].update(args)
    return {"pretrain": pre}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from tunesmith.pretraining import pretrain, train_tokenizer

    tmp = tmp_path_factory.mktemp("pretrain")
    section = _section(_corpus(tmp / "corpus.txt"))
    info = train_tokenizer(section["pretrain"]["corpus"], section["pretrain"]["tokenizer"], tmp / "tokenizer",
                           max_length=64)
    result = pretrain(tokenizer_dir=tmp / "tokenizer", section=section, model_out=tmp / "model",
                      metrics_path=tmp / "metrics.json", loss_path=tmp / "loss.png")
    assert [s for s, _ in result.histories["train_loss"]][:2] == [1, 2]  # the curve MLflow gets
    return tmp, info, json.loads((tmp / "metrics.json").read_text())


def test_tokenizer_has_specials_and_alternating_template(pretrained):
    from transformers import AutoTokenizer

    tmp, info, _ = pretrained
    assert info["vocab_size"] <= 512 and info["documents"] == 400
    tok = AutoTokenizer.from_pretrained(tmp / "tokenizer")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<|user|>", "<|bot|>", "<|end|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(8))  # in id order
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text == "<s><|user|>hi<|end|><|bot|>yo<|end|>"
    assert tok.decode(tok("the cat sees", add_special_tokens=False)["input_ids"]) == "the cat sees"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)
    assert type(tok.backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel"


def test_pretrain_loss_goes_down_and_model_is_a_base(pretrained):
    from transformers import AutoModelForCausalLM

    tmp, _, metrics = pretrained
    assert metrics["steps"] == 12
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.5
    assert metrics["eval_loss"] is not None and metrics["peak_memory_mb"] > 0
    assert (tmp / "loss.png").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp / "model")
    assert model.config.hidden_size == 256 and model.config.model_type == "llama"
    assert json.loads((tmp / "metrics.json").read_text())["tokens_per_second"] > 0


def test_sft_chain_runs_on_the_pretrained_model(pretrained, section_factory):
    """model.base: pretrained: the tokenizer's own template passes the contract gate (<|end|> closes turns)."""
    from conftest import write_sft_data

    from tunesmith.training import TrainPaths, train

    tmp, _, _ = pretrained
    template = (tmp / "model" / "chat_template.jinja")
    data = write_sft_data(tmp / "sft", 12, 4, template=template.read_text() if template.is_file() else None)
    section = section_factory("full", max_steps=2, max_length=256)
    paths = TrainPaths(base=str(tmp / "model"), model=str(tmp / "sft/out/model"), metrics=str(tmp / "sft/out/m.json"),
                     loss=str(tmp / "sft/out/loss.png"), **data)
    metrics = train(paths, section).metrics
    assert metrics["steps"] == 2 and metrics["pad_token"] == "<pad>"


def _other_corpus(path, n=300, seed=1):
    """Another domain than _corpus: words the first model has seen, in sentences it has not."""
    rng = random.Random(seed)
    lines = [f"in the morning {rng.choice(['the river', 'the quiet town', 'a long letter'])} "
             f"{rng.choice(['answers', 'remembers'])} {rng.choice(['my friend', 'the teacher', 'a small bird'])}."
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_continued_pretraining_keeps_the_tokenizer_and_lowers_the_loss(pretrained, section_factory):
    """kind: pretrain with an existing model.base: no new tokenizer, loss on held-out blocks of the new
    corpus goes down, and the SFT chain trains on the result."""
    from conftest import write_sft_data
    from transformers import AutoTokenizer

    from tunesmith.pretraining import pretrain
    from tunesmith.training import TrainPaths, train

    tmp, _, _ = pretrained
    out = tmp / "continued"
    section = _section(_other_corpus(tmp / "other.txt"), max_steps=10, learning_rate=3e-3)
    section["model"] = section_factory("full")["model"]
    pretrain(base=tmp / "model", section=section, model_out=out / "model", metrics_path=out / "metrics.json",
             loss_path=out / "loss.png")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["continued"] and metrics["steps"] == 10
    assert metrics["eval_loss"] < metrics["eval_loss_initial"] - 0.5, metrics
    before, after = AutoTokenizer.from_pretrained(tmp / "model"), AutoTokenizer.from_pretrained(out / "model")
    assert after.get_vocab() == before.get_vocab() and after.chat_template == before.chat_template
    assert json.loads((out / "model" / "tunesmith_source.json").read_text())["kind"] == "continued-pretrain"

    template = out / "model" / "chat_template.jinja"
    data = write_sft_data(out / "sft", 12, 4, template=template.read_text() if template.is_file() else None)
    paths = TrainPaths(base=str(out / "model"), model=str(out / "sft/model"), metrics=str(out / "sft/m.json"),
                     loss=str(out / "sft/loss.png"), **data)
    assert train(paths, section_factory("full", max_steps=2, max_length=256)).metrics["steps"] == 2


def test_pretrain_start_must_be_said(tmp_path):
    """The schema's default model.base must not turn a from-scratch recipe into continued pretraining."""
    from tunesmith.recipe import load_recipe

    path = tmp_path / "p.yaml"
    path.write_text("kind: pretrain\npretrain: {corpus: {source: c.txt}}\n")
    with pytest.raises(TunesmithError, match="kind: pretrain needs model.base: 'pretrained'"):
        load_recipe(path)
    path.write_text("kind: pretrain\nmodel: {base: some/model}\npretrain: {corpus: {source: c.txt}, "
                    "tokenizer: {vocab_size: 512}}\n")
    with pytest.raises(TunesmithError, match="pretrain.tokenizer only apply to pretraining from scratch"):
        load_recipe(path)
    path.write_text("kind: pretrain\nmodel: {base: some/model}\npretrain: {corpus: {source: c.txt}}\n")
    assert load_recipe(path)["model"]["base"] == "some/model"


def test_bad_corpus_and_config_are_named(tmp_path):
    from tunesmith.data.corpus import iter_corpus
    from tunesmith.pretraining import llama_config

    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(TunesmithError, match=r"c.jsonl, row 2: missing field 'text'"):
        list(iter_corpus({"source": str(bad), "text_column": "text"}))
    with pytest.raises(TunesmithError, match="not divisible"):
        llama_config({"hidden_size": 100, "num_attention_heads": 3}, None)
