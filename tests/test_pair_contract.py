"""The pair contract gate (dpo, kto): the prompt renders the same before chosen and rejected, each
completion ends in a supervised end-of-turn token, no double BOS. No training step."""

from __future__ import annotations

import copy

import pytest

from tunesmith import contract

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from conftest import train_section

    from tunesmith.contract import load_tokenizer

    tok, _ = load_tokenizer(smollm2_dir, None, {**train_section()["model"], "max_length": 256})
    return tok


def pairs(n: int = 4) -> list[dict]:
    from conftest import reverse_rows

    out = []
    for r in reverse_rows(n):
        words = r["prompt"][-1]["content"].split(": ", 1)[1]
        out.append({"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"],
                    "rejected": [{"role": "assistant", "content": words}]})
    return out


def with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def dpo_collator(tokenizer):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)


def test_stock_template_passes_with_trls_collators(tokenizer):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from tunesmith.data.preference import unpair

    contract.pair_gate(pairs(6), tokenizer, collator=dpo_collator(tokenizer), max_length=128, batch_size=4)
    kto = unpair(pairs(3))
    contract.pair_gate(kto, tokenizer, collator=DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id),
                       max_length=128, batch_size=4)


def test_prompt_that_renders_differently_before_the_answer_is_named(tokenizer):
    # A template that treats the last turn specially (as templates that hide reasoning from history
    # do): the system line appears only when the conversation ends with the user, so the prompt
    # alone and the prompt inside prompt + answer differ.
    tok = with_template(tokenizer, "{% if messages[-1]['role'] == 'user' %}<|im_start|>system\nAnswer now.<|im_end|>\n"
                                   "{% endif %}" + CHATML)
    with pytest.raises(contract.ContractError) as err:
        contract.pair_gate(pairs(2), tok, collator=dpo_collator(tok), max_length=128)
    text = str(err.value)
    assert "4 completion(s) of 2 train rows" in text
    assert "row id r0-0, chosen: the prompt renders differently at the start of the chosen sequence" in text
    assert "row id r0-0, rejected:" in text
    assert "the prompt alone reads 'Answer now." in text  # where the two renderings part


def test_completion_that_merges_with_the_prompt_is_named_with_its_field(tokenizer):
    rows = pairs(3)
    rows[1]["rejected"] = [{"role": "assistant", "content": "\n\nlamp, ocean"}]  # "\n" + "\n\n" tokenise as one
    with pytest.raises(contract.ContractError) as err:
        contract.pair_gate(rows, tokenizer, collator=dpo_collator(tokenizer), max_length=128)
    text = str(err.value)
    assert "1 completion(s) of 3 train rows" in text
    assert f"row id {rows[1]['id']}, rejected: the prompt renders differently" in text
    assert "merges with the prompt's last token" in text


def test_completion_without_end_of_turn_is_named(tokenizer):
    tok = with_template(tokenizer, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n"
                                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(contract.ContractError, match=r"row id r0-0, chosen: the completion does not end with the "
                                                     r"end-of-turn token '<\|im_end\|>'"):
        contract.pair_gate(pairs(2), tok, collator=dpo_collator(tok), max_length=128)


def test_end_of_turn_masked_by_the_collator_is_named(tokenizer):
    # A collator that leaves the last completion token out of completion_mask (as an off-by-one in a
    # custom collator would): the EOS is then never trained.
    inner = dpo_collator(tokenizer)

    def collator(examples):
        batch = inner(examples)
        mask = batch["completion_mask"]
        for row in range(mask.shape[0]):
            last = int(mask[row].nonzero().max())
            mask[row, last - 1:] = 0  # EOS and the newline after it
        return batch

    with pytest.raises(contract.ContractError, match=r"row id r0-0, chosen: the end-of-turn token '<\|im_end\|>' is "
                                                     r"not supervised"):
        contract.pair_gate(pairs(2), tokenizer, collator=collator, max_length=128)


def test_truncation_and_double_bos_are_named(tokenizer):
    rows = pairs(2)
    rows[0]["chosen"] = [{"role": "assistant", "content": "lamp " * 80}]
    with pytest.raises(contract.ContractError, match=r"row id r0-0, chosen: cut at max_length=64 before its "
                                                     r"end-of-turn token"):
        contract.pair_gate(rows, tokenizer, max_length=64)
    with pytest.raises(contract.ContractError, match=r"the prompt alone \(\d+ tokens\) fills max_length=16"):
        contract.pair_gate(pairs(1), tokenizer, max_length=16)
    # SmolLM2's BOS is <|im_start|>; a template that writes bos_token before ChatML doubles it.
    tok = with_template(tokenizer, "{{ bos_token }}" + CHATML)
    with pytest.raises(contract.ContractError, match=r"row id r0-0, chosen: starts with a double BOS"):
        contract.pair_gate(pairs(1), tok)


def test_grpo_prompts_with_double_bos_are_named(tokenizer):
    rows = [{"id": "q1", "prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}]
    contract.prompt_gate(rows, tokenizer)
    with pytest.raises(contract.ContractError, match=r"row id q1: starts with a double BOS"):
        contract.prompt_gate(rows, with_template(tokenizer, "{{ bos_token }}" + CHATML))
