"""dedupe.method minhash: datasketch signatures, LSH buckets, clusters; 1 shard == 4 shards, planted
near duplicates found at the documented recall, exact duplicates always removed, the auto choice,
the report. Real rows (GSM8K answers from ../shared/data), real libraries."""

from __future__ import annotations

import json
import numpy as np
import pandas as pd
import pytest

from conftest import shared_data_dir
from near_plant import plant, true_jaccard
from tunesmith import fileio
from tunesmith.data import batches, minhash, minhash_jobs
from tunesmith.stages import dedupe as dedupe_stage
from tunesmith.errors import DataError
from tunesmith.schema import section_defaults

GSM8K = shared_data_dir() / "gsm8k" / "train.jsonl"


def real_answers(n):
    if not GSM8K.exists():
        pytest.skip(f"shared data absent: {GSM8K}")
    with GSM8K.open(encoding="utf-8") as fh:
        return [json.loads(line)["answer"] for _, line in zip(range(n), fh)]


def write_rows(path, outputs, sources=None):
    """A filtered.parquet-like file (the columns dedupe reads and writes)."""
    n = len(outputs)
    frame = pd.DataFrame({"id": np.arange(n), "instruction": ["Solve the problem."] * n, "input": [""] * n,
                          "output": outputs, "n_tokens": np.full(n, 3)})
    if sources is not None:
        frame["source"] = sources
    fileio.write_parquet(path, frame)
    return str(path)


def section(**over):
    mh = over.pop("minhash", {})
    return section_defaults("dedupe", {"method": "minhash", **over, "minhash": mh})


def run_dedupe(tmp_path, src, sec, name, **kw):
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    r = dedupe_stage.dedupe(src, sec, str(out / "d.parquet"), str(out / "r.json"), str(out / "h.png"), offline=True, **kw)
    return r, json.loads((out / "r.json").read_text()), pd.read_parquet(out / "d.parquet")


def test_estimate_is_datasketch_jaccard():
    from datasketch import MinHash

    mh = section_defaults("dedupe")["minhash"]
    texts = ["the cat sat on the mat and looked at the dog for a while",
             "the cat sat on the mat and looked at the bird for a while"]
    sigs = minhash.signatures(texts, mh)
    ours = minhash.estimated_jaccard(sigs[:1], sigs[1:])[0]
    a, b = (MinHash(num_perm=mh["permutations"], seed=mh["seed"], hashvalues=s, scheme=minhash.SCHEME) for s in sigs)
    assert ours == pytest.approx(a.jaccard(b)) and 0.2 < ours < 0.9


def test_one_shard_and_four_shards_keep_the_same_rows(tmp_path, monkeypatch):
    """The rules' jobs (4 signature shards, 4 band groups, one cluster job, dedupe applying it) keep
    exactly the rows of the unsharded run, which does all of it in the dedupe job."""
    monkeypatch.setattr(batches, "BATCH_ROWS", 100)  # shard slices start and end inside row groups
    texts, planted = plant(real_answers(600), 0.2, seed=3)
    texts += texts[:5]  # exact copies (and the 20 planted at edit rate 0): exact dedupe removes them
    src = write_rows(tmp_path / "f.parquet", texts)
    sec = section()
    _, one, kept_one = run_dedupe(tmp_path, src, sec, "one")
    sigs = [str(tmp_path / f"s{i}.npz") for i in range(4)]
    for i, path in enumerate(sigs):
        assert minhash_jobs.minhash_shard(src, sec, i, 4, path).metrics["rows"] in (181, 182)
    buckets = [str(tmp_path / f"b{i}.npz") for i in range(4)]
    for g, path in enumerate(buckets):
        minhash_jobs.minhash_buckets(src, sigs, sec, g, 4, path)
    clusters = str(tmp_path / "c.npz")
    minhash_jobs.minhash_cluster(src, sigs, buckets, sec, clusters)
    _, four, kept_four = run_dedupe(tmp_path, src, sec, "four", clusters=clusters)
    assert kept_one["id"].tolist() == kept_four["id"].tolist()
    assert one == four
    assert one["exact_removed"] == 5 + 20 and one["near_removed"] > 15 and one["method"] == "minhash"
    # a misplaced or missing shard is named
    misplaced = r"s2.npz: shard 2 of 3 holds rows 362..543 of 725 \(181 signatures\), expected rows from 181"
    with pytest.raises(DataError, match=misplaced):
        minhash_jobs.minhash_buckets(src, [sigs[0], sigs[2], sigs[3]], sec, 0, 4, str(tmp_path / "x.npz"))
    with pytest.raises(DataError, match=r"cover bands .*: re-run the minhash_buckets jobs"):
        minhash_jobs.minhash_cluster(src, sigs, buckets[:3], sec, str(tmp_path / "x.npz"))


def test_planted_near_duplicates_are_found_at_the_documented_recall(tmp_path):
    """Real GSM8K answers, a fifth copied later with word-level edits at several rates: at the
    default settings recall >= 0.95 on the copies whose true shingle Jaccard is at or above the
    threshold, and a removed row is a planted copy or a real near duplicate of the row kept for it
    (true Jaccard at or above the threshold) in >= 99% of cases."""
    texts, planted = plant(real_answers(3000), 0.2, seed=0)
    src = write_rows(tmp_path / "f.parquet", texts)
    sec = section(exact=False)  # rate-0 copies (exact) are found by MinHash too
    t = sec["minhash"]["threshold"]
    _, report, kept = run_dedupe(tmp_path, src, sec, "run")
    kept_ids = set(kept["id"])
    jac = np.array([true_jaccard(texts[a], texts[b], sec["minhash"]["ngram"]) for a, b, _ in planted])
    found = np.array([b not in kept_ids for _, b, _ in planted])
    assert found[jac >= t].mean() >= 0.95, found[jac >= t].mean()
    assert found[jac == 1.0].all()
    copies = {b for _, b, _ in planted}
    removed = sorted(set(range(len(texts))) - kept_ids)
    with np.load(minhash_jobs.in_process(src, sec, str(tmp_path / "work"))) as c:  # the same clusters again
        root = dict(zip(c["removed"].tolist(), c["root"].tolist()))
    wrong = [r for r in removed if r not in copies and true_jaccard(texts[r], texts[root[r]], 5) < t]
    assert 1 - len(wrong) / len(removed) >= 0.99, (len(wrong), len(removed))
    assert report["near_removed"] == len(removed)


def test_exact_duplicate_is_always_removed(tmp_path):
    """With exact dedupe off, MinHash removes an exact copy (and one that differs in case, spaces and
    punctuation only); with it on, exact dedupe removes it first. Short rows too."""
    base = real_answers(200)
    texts = base + [base[10], base[50].upper().replace(" ", "  ") + "!", "Yes.", "yes"]
    src = write_rows(tmp_path / "f.parquet", texts)
    _, report, kept = run_dedupe(tmp_path, src, section(exact=False), "near")
    ids = set(kept["id"])
    assert {200, 201, 203}.isdisjoint(ids) and {10, 50, 202} <= ids
    _, report, kept = run_dedupe(tmp_path, src, section(), "exact")
    assert report["exact_removed"] == 1 and 200 not in set(kept["id"])


def test_auto_picks_embedding_below_the_row_limit_and_minhash_above(tmp_path):
    sec = section_defaults("dedupe", {"method": "auto", "auto_embedding_max_rows": 100})
    assert minhash.choose_method(sec, 100)[0] == "embedding"
    method, why = minhash.choose_method(sec, 101)
    assert method == "minhash" and "101 rows > dedupe.auto_embedding_max_rows (100)" in why
    assert minhash.choose_method(section_defaults("dedupe"), 10**8)[0] == "embedding"  # the default method
    texts = real_answers(150) + real_answers(5)  # 150 rows after exact dedupe: above the limit
    src = write_rows(tmp_path / "f.parquet", texts)
    _, report, _ = run_dedupe(tmp_path, src, sec, "auto")
    assert report["method"] == "minhash" and "150 rows" in report["method_reason"]


def test_report_fields(tmp_path):
    texts, _ = plant(real_answers(400), 0.25, seed=1)
    sources = ["gsm8k" if i % 3 else "other" for i in range(len(texts))]
    src = write_rows(tmp_path / "f.parquet", texts, sources)
    r, report, _ = run_dedupe(tmp_path, src, section(sample_pairs=5), "run")
    assert report["method"] == "minhash" and report["method_reason"] == "dedupe.method is minhash"
    assert report["clusters"] > 0 and sum(report["cluster_sizes"].values()) == report["clusters"]
    assert report["near_removed"] >= report["clusters"]
    ex = report["examples"]
    assert len(ex) == 5 and all(e["kept_id"] < e["removed_id"] for e in ex)
    assert all(abs(e["jaccard_estimate"] - e["jaccard"]) < 0.15 and e["jaccard"] > 0.5 for e in ex), ex
    assert ex == sorted(ex, key=lambda e: e["jaccard_estimate"])
    assert sum(report["near_removed_by_source"].values()) == report["near_removed"]
    assert set(report["rows_by_source"]) == {"gsm8k", "other"}
    assert report["minhash"]["detection_probability_at_threshold"] == pytest.approx(0.98, abs=0.01)
    assert r.metrics["near_removed"] == report["near_removed"]


def test_bands_must_fit_the_permutations():
    with pytest.raises(DataError, match=r"bands \(40\) x rows_per_band \(8\) = 320 is more than permutations"):
        minhash.settings(section(minhash={"bands": 40, "rows_per_band": 8}))


def test_minhash_scatters_signatures_buckets_and_one_cluster_job(tmp_path):
    """dataset.shards 4, method minhash: 4 signature jobs, 4 band-group jobs, one cluster job, no
    embedding job; one shard: none of them (the dedupe job runs MinHash itself)."""
    from test_data_dedupe import _dry_run_jobs

    counts, out = _dry_run_jobs(tmp_path / "four", 4, method="minhash")
    assert {k: counts.get(k) for k in ("minhash_shard", "minhash_buckets", "minhash_cluster", "dedupe",
                                       "embed_shard")} == {"minhash_shard": 4, "minhash_buckets": 4,
                                                           "minhash_cluster": 1, "dedupe": 1, "embed_shard": None}
    counts, _ = _dry_run_jobs(tmp_path / "one", 1, method="minhash")
    assert not {"minhash_shard", "minhash_buckets", "minhash_cluster"} & set(counts), counts


def test_keep_first_rule_drops_a_row_only_for_a_kept_partner():
    """The embedding path's rule, not connected components: in a chain 0~1~2 row 2 stays (its only
    partner, 1, was dropped for 0, and 2 may be far from 0); a row with two kept partners is
    dropped for the more similar one; a row outside the exact-dedupe survivors is never touched."""
    pairs = np.array([[0, 1], [1, 2], [0, 3], [4, 5], [2, 5]])
    jaccard = np.array([0.8, 0.8, 0.9, 0.76, 0.9])
    c = minhash.clusters(7, pairs, np.array([True] * 6 + [False]), jaccard, 0.75)
    assert c["keep"].tolist() == [True, False, True, False, True, False, True]
    assert c["root"].tolist() == [0, 0, 2, 0, 4, 2, 6]
    below = minhash.clusters(3, pairs[:2], np.ones(3, bool), np.array([0.8, 0.7]), 0.75)
    assert below["keep"].tolist() == [True, False, True] and len(below["pairs"]) == 1
