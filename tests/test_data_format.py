"""format: templates (model, chatml, llama-3, alpaca, custom), EOS after every assistant turn,
prompt/completion rows, deterministic capped split, preview rendered as the model sees it."""

from __future__ import annotations

import json

import pytest

from tunesmith.data import formatting, load
from tunesmith.stages.format import format_rows
from tunesmith.errors import DataError
from tunesmith.schema import section_defaults

def fmt(**values):
    """The format section as the stage gets it (schema defaults filled)."""
    return section_defaults("format", values)


CONV = [{"role": "user", "content": "Reverse: a, b"}, {"role": "assistant", "content": "b, a"}]


def rows(n=20):
    out = [{"id": i, "instruction": f"Reverse: w{i}, x{i}", "input": "" if i % 3 else "extra",
            "output": f"x{i}, w{i}", "system": "row system" if i == 0 else "", "messages": [], "text": ""}
           for i in range(n)]
    out.append({"id": n, "instruction": "", "input": "", "output": "bye", "system": "", "text": "",
                "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye?"},
                             {"role": "assistant", "content": "bye"}]})
    return load.to_frame(out)


@pytest.mark.parametrize("name", ["model", "chatml", "alpaca"])
def test_templates_end_assistant_turns_with_eos(name, data_tokenizer, smollm2_dir):
    template = formatting.resolve_template(fmt(template=name), data_tokenizer)
    assert formatting.check_end_of_turn(data_tokenizer, template, name, smollm2_dir) == "<|im_end|>"
    text = formatting.render(data_tokenizer, template, CONV)
    assert "b, a<|im_end|>" in text


def test_alpaca_layout(data_tokenizer):
    text = formatting.render(data_tokenizer, formatting.named_template("alpaca"), CONV)
    assert "### Instruction:\nReverse: a, b\n\n### Response:\nb, a<|im_end|>" in text


def test_llama3_needs_its_own_end_of_turn_token(data_tokenizer):
    template = formatting.named_template("llama-3")
    text = formatting.render(data_tokenizer, template, CONV)
    assert "<|start_header_id|>assistant<|end_header_id|>\n\nb, a<|eot_id|>" in text
    # SmolLM2 does not stop at <|eot_id|>: training on it would never learn to stop.
    with pytest.raises(DataError, match=r"does not end an assistant turn with a token generation stops at"):
        formatting.check_end_of_turn(data_tokenizer, template, "llama-3")


def test_custom_template_text_and_file(tmp_path, data_tokenizer):
    custom = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    assert formatting.resolve_template(fmt(template="custom", custom_template=custom), data_tokenizer) == custom
    path = tmp_path / "t.jinja"
    path.write_text(custom)
    text = formatting.resolve_template(fmt(template="custom", custom_template=str(path)), data_tokenizer)
    formatting.check_end_of_turn(data_tokenizer, text, "custom")
    with pytest.raises(DataError, match="does not end an assistant turn"):
        formatting.check_end_of_turn(data_tokenizer, "{% for m in messages %}{{ m['content'] }}{% endfor %}", "custom")
    with pytest.raises(DataError, match="failed to render"):
        formatting.render(data_tokenizer, "{{ messages[0]['content'] | nosuchfilter }}", CONV)


def test_conversations_system_prompt_and_multi_turn():
    frame = rows()
    prompt, completion = formatting.conversation(frame.iloc[3].to_dict(), None)
    assert prompt == [{"role": "user", "content": "Reverse: w3, x3\n\nextra"}]
    assert completion == [{"role": "assistant", "content": "x3, w3"}]
    prompt, _ = formatting.conversation(frame.iloc[0].to_dict(), None)
    assert prompt[0] == {"role": "system", "content": "row system"}
    prompt, _ = formatting.conversation(frame.iloc[0].to_dict(), "fixed")
    assert prompt[0] == {"role": "system", "content": "fixed"}
    prompt, completion = formatting.conversation(frame.iloc[20].to_dict(), "fixed")
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"] and prompt[0]["content"] == "fixed"
    assert completion == [{"role": "assistant", "content": "bye"}]


def test_split_is_seeded_and_capped():
    a = formatting.split_positions(1000, 0.1, 200, 7)
    assert len(a) == 100 and (a == formatting.split_positions(1000, 0.1, 200, 7)).all()
    assert list(a) != list(formatting.split_positions(1000, 0.1, 200, 8))
    assert len(formatting.split_positions(1000, 0.5, 60, 7)) == 60
    assert len(formatting.split_positions(5, 0.0, 60, 7)) == 0


def test_stage_outputs(tmp_path, data_tokenizer, smollm2_dir):
    selected = tmp_path / "selected.parquet"
    rows().to_parquet(selected)
    out = {k: str(tmp_path / f) for k, f in [("train", "train.jsonl"), ("eval", "eval.jsonl"),
                                              ("preview", "preview.txt"), ("template", "t.jinja")]}
    section = fmt(system_prompt="You reverse.", eval_fraction=0.2, eval_max_rows=3, seed=1, preview_rows=2)
    metrics = format_rows(str(selected), str(smollm2_dir), section, out["train"], out["eval"], out["preview"],
                          out["template"], str(tmp_path / "format_report.json"), tokenizer=data_tokenizer).metrics
    train = [json.loads(line) for line in open(out["train"])]
    evals = [json.loads(line) for line in open(out["eval"])]
    assert metrics["rows_train"] == 18 and metrics["rows_eval"] == 3 == len(evals)
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in evals)
    assert all(set(r) == {"id", "prompt", "completion"} for r in train)
    assert all(r["answer"] == r["completion"][0]["content"] and isinstance(r["answer"], str) for r in evals)
    assert train[0]["prompt"][0] == {"role": "system", "content": "You reverse."}
    assert open(out["template"]).read() == data_tokenizer.chat_template
    preview = open(out["preview"]).read()
    first = train[0]
    rendered = data_tokenizer.apply_chat_template(first["prompt"] + first["completion"], tokenize=False)
    assert rendered.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n" + formatting.COMPLETION_START, 1) \
        .rstrip("\n") in preview.replace(formatting.COMPLETION_END, "")
    assert preview.count("===== example") == 2


def test_text_rows_cannot_be_formatted(tmp_path, data_tokenizer, smollm2_dir):
    frame = load.to_frame([{"id": 0, "instruction": "", "input": "", "output": "doc", "system": "",
                            "messages": [], "text": "doc"}])
    frame.to_parquet(tmp_path / "s.parquet")
    with pytest.raises(DataError, match="dataset.schema: text"):
        format_rows(str(tmp_path / "s.parquet"), str(smollm2_dir), fmt(), *(str(tmp_path / f) for f in "abcde"),
                    tokenizer=data_tokenizer)
