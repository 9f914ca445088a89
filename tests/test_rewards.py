"""Verifiable rewards: the built-ins, custom rewards by dotted path, and the calling convention of
trl's GRPOTrainer (prompts, completions as message lists, dataset columns as keywords)."""

from __future__ import annotations

import json

import pytest

from tunesmith import rewards
from tunesmith.errors import TunesmithError


def said(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def vowel_share(prompts, completions, **kwargs):
    """A custom reward for the dotted-path tests (module-level, as trl's callables are)."""
    texts = [rewards.completion_text(c) for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]


def test_exact_match_normalises_whitespace_and_case():
    out = rewards.exact_match(prompts=[[]] * 4, completions=[said("  Tiger,  LAMP\n"), said("tiger, lamp."),
                                                             "tiger, lamp", said("")],
                              answer=["tiger, lamp"] * 4, completion_ids=[[1]] * 4, trainer_state=None)
    assert out == [1.0, 0.0, 1.0, 0.0]


def test_gsm8k_answer_compares_numbers_after_the_hashes():
    completions = [said("6 * 12 = 72\n#### 72"), said("#### 1,000"), said("#### 72.0"), said("The answer is 72"),
                   said("#### 71"), said("#### 5 then #### -3")]
    answers = ["Natalia sold 48/2 = 24 ... #### 72", "1000", "72", "#### 72", "72", "-3"]
    assert rewards.gsm8k_answer(prompts=[[]] * 6, completions=completions, answer=answers) == \
        [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(TunesmithError, match=r"reference answer 'no number here' holds no number"):
        rewards.gsm8k_answer(prompts=[[]], completions=[said("#### 1")], answer=["no number here"])


def test_gsm8k_answer_on_the_real_test_set(shared_data):
    # The reference solutions themselves score 1; the same solutions with the final number off by one score 0.
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:100]]
    answers = [r["answer"] for r in rows]
    assert rewards.gsm8k_answer([[]] * 100, [said(a) for a in answers], answer=answers) == [1.0] * 100
    wrong = [a.rsplit("####", 1)[0] + f"#### {rewards.parse_number(a) + 1}" for a in answers]
    assert rewards.gsm8k_answer([[]] * 100, [said(w) for w in wrong], answer=answers) == [0.0] * 100


def test_format_regex_and_resolution_of_builtins():
    funcs = rewards.resolve(["exact_match", "format_regex", "gsm8k_answer"], format_pattern=r"####\s*-?\d+\s*$")
    assert [f.__name__ for f in funcs] == ["exact_match", "format_regex", "gsm8k_answer"]  # trl logs by __name__
    assert funcs[1](prompts=[[]] * 2, completions=[said("so #### 12"), said("12")]) == [1.0, 0.0]
    with pytest.raises(TunesmithError, match=r"lists format_regex but train.grpo.format_pattern is empty"):
        rewards.resolve(["format_regex"])
    with pytest.raises(TunesmithError, match=r"format_pattern '\(' is not a valid regular expression"):
        rewards.resolve(["format_regex"], format_pattern="(")


def test_custom_reward_by_dotted_path_both_spellings():
    for name in ("test_rewards:vowel_share", "test_rewards.vowel_share"):
        (func,) = rewards.resolve([name])
        assert func is vowel_share
    assert rewards.score(func, [[]], [said("aa")], ["x"]) == [1.0]


def test_unknown_and_unimportable_rewards_are_named():
    with pytest.raises(TunesmithError, match=r"unknown reward 'exact_mach'.*did you mean 'exact_match'\?"):
        rewards.resolve(["exact_mach"])
    with pytest.raises(TunesmithError, match=r"cannot import module 'no_such_pkg\.mod' for reward"):
        rewards.resolve(["no_such_pkg.mod:f"])
    with pytest.raises(TunesmithError, match=r"'test_rewards' has no function 'nope'"):
        rewards.resolve(["test_rewards:nope"])


def test_rewards_that_need_a_reference_say_so():
    with pytest.raises(TunesmithError, match=r"reward 'exact_match' compares with a reference answer, but the train "
                                             r"rows have no answer column"):
        rewards.exact_match(prompts=[[]], completions=[said("x")])
