"""Verifiable rewards for GRPO and for the verifier that builds preference pairs.

A reward has the signature trl's GRPOTrainer calls: ``f(prompts, completions, **columns)`` with
one entry per completion, where ``columns`` holds the dataset's other columns (here ``answer``,
the reference) plus trl's extras (completion_ids, trainer_state, log_metric, ...), and it returns
one float per completion (None: not scorable). Completions are message lists for conversational
prompts, plain strings otherwise; both are accepted.

Built-ins: exact_match, gsm8k_answer, format_regex. Any other name is a dotted path to a function
(``package.module:function`` or ``package.module.function``), imported from the recipe only: it
runs inside the training job with the rights of the person running the workflow, and nothing read
from a dataset ever names code to import.
"""

from __future__ import annotations

import difflib
import importlib
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Sequence

from tunesmith.errors import TunesmithError

Reward = Callable[..., list[float | None]]

_SPACE = re.compile(r"\s+")
# The GSM8K convention: the final answer follows '####'; commas group thousands, '$' may lead.
_AFTER_HASHES = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"^\s*\$?\s*(-?[\d,]*\.?\d+)\s*$")


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or the contents of a message list's assistant turns."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))


def normalise(text: str) -> str:
    """Trimmed, whitespace runs collapsed to one space, lower-cased: what exact_match compares."""
    return _SPACE.sub(" ", text).strip().lower()


def _references(answer: Sequence[Any] | None, n: int, reward: str) -> Sequence[Any]:
    if answer is None:
        raise TunesmithError(f"reward '{reward}' compares with a reference answer, but the train rows have no "
                             f"answer column (train.grpo.answer_field names it)")
    if len(answer) != n:
        raise TunesmithError(f"reward '{reward}': {n} completions but {len(answer)} reference answers")
    return answer


def exact_match(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
                **kwargs: Any) -> list[float]:
    """1.0 when the completion equals the reference answer after normalise(), else 0.0."""
    refs = _references(answer, len(completions), "exact_match")
    return [float(normalise(completion_text(c)) == normalise(str(r))) for c, r in zip(completions, refs)]


def parse_number(text: str) -> Decimal | None:
    """The number after the last '####' (GSM8K); for text without '####', the text itself if it is
    one number. None when there is none."""
    found = _AFTER_HASHES.findall(text)
    raw = found[-1] if found else (m.group(1) if (m := _NUMBER.match(text)) else None)
    return _decimal(raw)


def _decimal(raw: str | None) -> Decimal | None:
    if raw is None:
        return None
    try:
        return Decimal(raw.replace(",", ""))
    except InvalidOperation:
        return None


def gsm8k_answer(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
                 **kwargs: Any) -> list[float]:
    """1.0 when the number after the completion's last '####' equals the reference's (as numbers:
    '1,000' == '1000.0'), else 0.0; a completion without '####' scores 0."""
    refs = _references(answer, len(completions), "gsm8k_answer")
    out = []
    for completion, ref in zip(completions, refs):
        want = parse_number(str(ref))
        if want is None:
            raise TunesmithError(f"reward 'gsm8k_answer': the reference answer {str(ref)[-80:]!r} holds no number "
                                 f"after '####'")
        found = _AFTER_HASHES.findall(completion_text(completion))
        got = _decimal(found[-1]) if found else None
        out.append(float(got is not None and got == want))
    return out


def format_regex(pattern: str) -> Reward:
    """A reward giving 1.0 to completions that re.search(pattern) matches, else 0.0."""
    try:
        compiled = re.compile(pattern, flags=re.DOTALL)
    except re.error as exc:
        raise TunesmithError(f"train.grpo.format_pattern {pattern!r} is not a valid regular expression: {exc}") from None

    def format_regex(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]

    return format_regex


BUILTINS = ("exact_match", "gsm8k_answer", "format_regex")


def _import(path: str) -> Reward:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise TunesmithError(f"train.grpo.rewards: '{path}' is neither a built-in reward ({', '.join(BUILTINS)}) nor a "
                             f"dotted path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TunesmithError(f"train.grpo.rewards: cannot import module '{module_name}' for reward '{path}' ({exc}); "
                             f"it must be importable from the workflow's environment") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise TunesmithError(f"train.grpo.rewards: '{module_name}' has no function '{attr}' (reward '{path}')")
    return func


def resolve(names: Sequence[str], format_pattern: str | None = None) -> list[Reward]:
    """The reward functions a recipe names (train.grpo.rewards), in order."""
    out: list[Reward] = []
    for name in names:
        if name == "exact_match":
            out.append(exact_match)
        elif name == "gsm8k_answer":
            out.append(gsm8k_answer)
        elif name == "format_regex":
            if not format_pattern:
                raise TunesmithError("train.grpo.rewards lists format_regex but train.grpo.format_pattern is empty")
            out.append(format_regex(format_pattern))
        elif "." in name or ":" in name:
            out.append(_import(name))
        else:
            close = difflib.get_close_matches(name, BUILTINS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TunesmithError(f"train.grpo.rewards: unknown reward '{name}' (built-ins: {', '.join(BUILTINS)}; "
                                 f"or a dotted path 'package.module:function'){hint}")
    return out


def score(reward: Reward, prompts: Sequence[Any], completions: Sequence[Any], answers: Sequence[Any]) -> list[float]:
    """Call a reward the way GRPOTrainer does and check it returned one number per completion."""
    values = reward(prompts=list(prompts), completions=list(completions), answer=list(answers))
    name = getattr(reward, "__name__", type(reward).__name__)
    if len(values) != len(completions):
        raise TunesmithError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions")
    return [float("nan") if v is None else float(v) for v in values]
