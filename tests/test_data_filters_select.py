"""filter (every drop counted, empty result names the filter) and select."""

from __future__ import annotations

import pandas as pd
import pytest

from tunesmith.data import filters, selection
from tunesmith.errors import DataError
from tunesmith.schema import section_defaults


def rows():
    data = [("q", "a", 5), ("q", "   ", 4), ("", "a", 3), ("q", "long " * 50, 300), ("q", "a", 1),
            ("q", "contains SECRET", 10), ("q", "fine answer", 12)]
    return pd.DataFrame({"id": range(len(data)), "instruction": [d[0] for d in data], "input": "",
                         "output": [d[1] for d in data], "system": "", "text": "",
                         "n_instruction_tokens": [1] * len(data),
                         "n_output_tokens": [max(d[2] - 1, 0) for d in data], "n_tokens": [d[2] for d in data]})


def filter_section(**values):
    """The filter section as the stage gets it: schema defaults filled, regex rules included."""
    return section_defaults("filter", {"min_tokens": 2, "max_tokens": 100,
                                       "regex": [{"name": "secret", "pattern": "SECRET"}], **values})


def select_section(**values):
    return section_defaults("select", values)


def test_every_drop_counted_by_reason():
    kept, report = filters.apply(rows(), filter_section())
    assert report["drops"] == {"empty": 2, "min_tokens": 1, "max_tokens": 1, "min_output_tokens": 0, "regex:secret": 1}
    assert report["rows_in"] == report["rows_out"] + sum(report["drops"].values()) == 7
    assert kept["id"].tolist() == [0, 6]


def test_keep_rule_and_bad_pattern():
    keep = filter_section(regex=[{"name": "must_say_fine", "pattern": "^fine", "action": "keep"}])
    kept, report = filters.apply(rows(), keep)
    assert kept["id"].tolist() == [6] and report["drops"]["regex:must_say_fine"] == 2
    with pytest.raises(DataError, match=r"filter.regex rule 'bad': invalid pattern"):
        filters.apply(rows(), filter_section(regex=[{"name": "bad", "pattern": "("}]))


def test_filter_that_empties_the_dataset_is_named():
    with pytest.raises(DataError, match=r"filter 'max_tokens' removed the last 4 rows.*Loosen filter.max_tokens"):
        filters.apply(rows(), filter_section(max_tokens=2, regex=[]))
    with pytest.raises(DataError, match=r"filter 'regex:all' .*rule 'all'"):
        filters.apply(rows(), filter_section(drop_empty=False, min_tokens=0, max_tokens=None, min_output_tokens=0,
                                             regex=[{"name": "all", "field": "instruction", "pattern": ".*"}]))


def test_select_strategies():
    frame = rows()
    assert len(selection.apply(frame, select_section())[0]) == 7
    top, report = selection.apply(frame, select_section(strategy="top_k", k=2))
    assert top["id"].tolist() == [3, 6] and report["rows_out"] == 2  # longest two, original order
    a = selection.apply(frame, select_section(strategy="random_k", k=3, seed=1))[0]["id"].tolist()
    b = selection.apply(frame, select_section(strategy="random_k", k=3, seed=1))[0]["id"].tolist()
    c = selection.apply(frame, select_section(strategy="random_k", k=3, seed=2))[0]["id"].tolist()
    assert a == b and a == sorted(a) and len(set(a)) == 3 and c != a
    assert len(selection.apply(frame, select_section(strategy="top_k", k=100))[0]) == 7
