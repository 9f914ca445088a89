"""Template/EOS contract gate and the GPU-method errors: fast, no training step."""

from __future__ import annotations

import pytest
from conftest import reverse_rows

from tunesmith import contract
from tunesmith.errors import EnvironmentNotSupported
from tunesmith.methods import METHODS


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from conftest import train_section

    from tunesmith.contract import load_tokenizer

    tok, added = load_tokenizer(smollm2_dir, None, {**train_section()["model"], "max_length": 256})
    assert not added
    return tok


def test_distinct_pad_chosen_for_smollm2(tokenizer):
    # SmolLM2 ships pad == eos == <|im_end|>; training must pad with something else.
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"


def test_gate_passes_stock_template_with_trl_collator(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = contract.tokenize_rows(tokenizer, reverse_rows(6), 128)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    contract.gate(examples, tokenizer, collator=collator, max_length=128, batch_size=3)
    # Response-only: the first supervised token comes after the assistant header.
    first = next(i for i, lab in enumerate(examples[0]["labels"]) if lab != -100)
    assert tokenizer.decode(examples[0]["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def test_gate_catches_template_that_masks_everything(tokenizer):
    # This template drops assistant turns: prompt and prompt+completion render the same.
    tokenizer = _copy(tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
                               "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    examples = contract.tokenize_rows(tokenizer, reverse_rows(3), 128)
    with pytest.raises(contract.ContractError, match=r"example 0: no supervised token"):
        contract.gate(examples, tokenizer, max_length=128)


def test_gate_catches_template_without_eos(tokenizer):
    tokenizer = _copy(tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    examples = contract.tokenize_rows(tokenizer, reverse_rows(2), 128)
    with pytest.raises(contract.ContractError, match=r"example 0: response does not end with a supervised"):
        contract.gate(examples, tokenizer, max_length=128)


def test_gate_catches_pad_equal_eos_masking(tokenizer):
    # The classic bug: pad = EOS plus a collator that masks pad positions also masks the real EOS.
    from transformers import DataCollatorForLanguageModeling

    tokenizer = _copy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    examples = contract.tokenize_rows(tokenizer, reverse_rows(4), 128)
    lm_collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def collator(batch):  # derives labels from input_ids and masks every pad (= EOS) position
        return lm_collator([{"input_ids": e["input_ids"]} for e in batch])

    with pytest.raises(contract.ContractError, match=r"example 0: pad token equals EOS"):
        contract.gate(examples, tokenizer, collator=collator, max_length=128, batch_size=2)


def test_gate_catches_double_bos_and_truncation(tokenizer):
    examples = contract.tokenize_rows(tokenizer, reverse_rows(2), 128)
    bos = tokenizer.bos_token_id
    examples[1] = {"input_ids": [bos] + examples[1]["input_ids"], "labels": [-100] + examples[1]["labels"]}
    with pytest.raises(contract.ContractError, match=r"example 1: starts with a double BOS"):
        contract.gate(examples, tokenizer)
    short = contract.tokenize_rows(tokenizer, reverse_rows(1), 40)
    with pytest.raises(contract.ContractError, match=r"example 0: response cut at max_length=40"):
        contract.gate(short, tokenizer, max_length=40)


@pytest.mark.parametrize("method", [m for m, entry in METHODS.items() if entry.needs_cuda])
def test_gpu_methods_fail_fast_on_cpu(method, tmp_path, sft_data, section_factory, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from tunesmith.training import TrainPaths, train

    paths = TrainPaths(base=str(tmp_path / "no-model-needed"), model=str(tmp_path / "m"),
                     metrics=str(tmp_path / "t/metrics.json"), loss=str(tmp_path / "t/loss.png"), **sft_data)
    with pytest.raises(EnvironmentNotSupported, match=r"needs a CUDA GPU.*use 'method: lora'"):
        train(paths, section_factory(method))
    assert not (tmp_path / "t").exists()  # nothing written, nothing loaded


def test_unknown_target_modules_list_what_the_model_has(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.errors import TunesmithError
    from tunesmith.methods import check_target_modules

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(TunesmithError, match=r"\['c_attn'\].*q_proj.*v_proj"):
        check_target_modules(model, ["c_attn", "q_proj"])
    assert check_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


def test_bad_row_names_file_row_and_field(tmp_path):
    from tunesmith.errors import DataError
    from tunesmith.data.formatting import read_split as read_conversations

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "assistant", "content": "y"}]}\n'
                   '{"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": 3}]}\n')
    with pytest.raises(DataError, match=r"train.jsonl, row 2, field 'completion\[0\]'"):
        read_conversations(bad)


def _copy(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def test_multi_gpu_launch_names_everything_itself(tmp_path):
    """No default accelerate config decides the launch; a free port, not 29500; list inputs survive."""
    from tunesmith import launch
    from tunesmith.stageio import StageIO

    io = StageIO(input={"train": "t.jsonl", "reports": ["a.json", "b.json"]}, output={"metrics": "m.json"},
                 params={}, wildcards={"recipe": "r", "variant": "v"}, stage="train")
    port = launch.free_port()
    cmd = launch.launch_command(2, io, tmp_path / "p.json", port)
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert cmd[cmd.index("--main_process_port") + 1] == str(port) != "29500"
    assert cmd[cmd.index("--mixed_precision") + 1] == "no"
    assert "reports=a.json,b.json" in cmd and cmd[cmd.index("--variant") + 1] == "v"


def test_merge_refuses_a_bitsandbytes_base(tmp_path, tiny_llama_dir, sft_data, section_factory):
    import json
    import shutil

    from tunesmith.errors import TunesmithError
    from tunesmith.merging import merge

    base = shutil.copytree(tiny_llama_dir, tmp_path / "bnb-4bit")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "tunesmith_train.json").write_text(json.dumps({"method": "unsloth"}))
    with pytest.raises(TunesmithError, match="16-bit original"):
        merge(trained=trained, base=base, template=sft_data["template"], merged=tmp_path / "m",
              samples_path=tmp_path / "s.txt", check_path=tmp_path / "c.json", section=section_factory("unsloth"))
