"""dedupe: exact hash, greedy keep order, faiss index kinds, the embedding model, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tunesmith.data import duplicates, load
from tunesmith.errors import DataError, EnvironmentNotSupported
from tunesmith.schema import section_defaults


def canon(outputs, instructions=None):
    instructions = instructions or [f"task {i}" for i in range(len(outputs))]
    return load.to_frame([{"id": i, "instruction": ins, "input": "", "output": out, "system": "", "messages": [],
                           "text": ""} for i, (ins, out) in enumerate(zip(instructions, outputs))]).assign(n_tokens=3)


def test_exact_duplicates_are_normalised():
    frame = canon(["Hello  World", "hello world", "other"], ["Q", " q ", "Q"])
    keep, pairs = duplicates.exact_duplicates(frame)
    assert keep.tolist() == [True, False, True] and pairs == [(0, 1)]


def test_greedy_keep_drops_only_against_kept_earlier_rows():
    # 0 ~ 1 (0.95), 1 ~ 2 (0.95), 0 !~ 2: with 1 dropped, 2 stays (no kept earlier row is similar).
    sims = np.array([[1, .95, .5], [1, .95, .95], [1, .95, .5]], dtype=np.float32)
    ids = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    keep, pairs = duplicates.greedy_keep(sims, ids, 0.9)
    assert keep.tolist() == [True, False, True]
    assert pairs == [(0, 1, pytest.approx(0.95))]


def random_unit(n, d=32, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_index_kinds_find_planted_near_duplicates(kind):
    base = random_unit(400)
    rng = np.random.default_rng(1)
    noisy = base[:40] + 0.05 * rng.normal(size=(40, 32)).astype(np.float32)
    vectors = np.vstack([base, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    result = duplicates.near_duplicates(vectors, 0.9, k=5, index=kind)
    assert result.index_type == kind
    assert (~result.keep).sum() == 40 and result.keep[:400].all()
    assert all(removed - kept == 400 and sim >= 0.9 for kept, removed, sim in result.pairs)


def test_flat_rescan_finds_a_kept_row_beyond_k():
    # 12 identical vectors: with k=3 every row's neighbours are all above the threshold; row order decides.
    vectors = np.repeat(random_unit(1), 12, axis=0)
    result = duplicates.near_duplicates(vectors, 0.9, k=3, index="flat")
    assert result.keep.tolist() == [True] + [False] * 11


class GpuLikeIndex:
    """What faiss's GPU flat index offers the dedupe: search with k at most 2048, no range search."""

    def __init__(self, cpu_index):
        self.cpu = cpu_index

    def search(self, x, k):
        assert k <= duplicates.GPU_MAX_K, f"faiss GPU k-selection stops at 2048, asked {k}"
        return self.cpu.search(x, k)


def test_gpu_flat_index_caps_k_and_rescans_on_its_cpu_copy(monkeypatch):
    # A cluster bigger than k (and k above the GPU's cap): the GPU path searched without a rescan
    # used to keep rows the CPU path removes. Now it caps k and rescans on the CPU flat copy.
    vectors = np.vstack([np.repeat(random_unit(1, seed=3), 30, axis=0), random_unit(20, seed=4)])
    cpu = duplicates.near_duplicates(vectors, 0.9, k=3, index="flat")
    real_build = duplicates.build_index

    def on_gpu(vecs, kind, settings=None):
        index, _, flat = real_build(vecs, kind, settings)
        return GpuLikeIndex(index), "gpu", flat

    monkeypatch.setattr(duplicates, "build_index", on_gpu)
    gpu = duplicates.near_duplicates(vectors, 0.9, k=3, index="flat")
    assert gpu.index_device == "gpu"
    assert gpu.keep.tolist() == cpu.keep.tolist() == [True] + [False] * 29 + [True] * 20
    many = random_unit(2100, seed=5)
    index, _, _ = real_build(many, "flat")
    sims, ids = duplicates.neighbours(GpuLikeIndex(index), many, 3000, "gpu")
    assert sims.shape == ids.shape == (2100, duplicates.GPU_MAX_K)


def test_auto_index_switches_to_ivf_beyond_flat_max_rows():
    assert duplicates.index_kind(100_000) == "flat" and duplicates.index_kind(100_001) == "ivf"
    assert duplicates.index_kind(501, flat_max_rows=500) == "ivf"
    assert duplicates.index_kind(10, "hnsw") == "hnsw"
    vectors = random_unit(600)
    result = duplicates.near_duplicates(vectors, 0.9, k=3, settings=section_defaults("dedupe", {"flat_max_rows": 500}))
    assert result.index_type == "ivf"


def clustered(seed=7):
    """Clusters of 1 to 25 near-identical rows around random centres (bigger than k, so rows are
    rescanned), in shuffled order, plus pairs straddling the threshold."""
    rng = np.random.default_rng(seed)
    centres = random_unit(60, d=48, seed=seed)
    sizes = rng.integers(1, 26, len(centres))
    rows = np.repeat(centres, sizes, axis=0) + 0.004 * rng.normal(size=(sizes.sum(), 48)).astype(np.float32)
    straddle = centres[:20] + rng.uniform(0.02, 0.06, (20, 1)).astype(np.float32) * rng.normal(size=(20, 48)).astype(np.float32)
    rows = np.vstack([rows, straddle])[rng.permutation(sizes.sum() + 20)]
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def found_pairs(result, threshold):
    pairs = set()
    lists = [(pos, result.sims[pos], result.ids[pos]) for pos in range(len(result.ids))]
    lists += [(pos, s, i) for pos, (s, i) in result.rescans.items()]
    for pos, sims, ids in lists:
        pairs |= {(min(pos, int(j)), max(pos, int(j))) for s, j in zip(sims, ids) if j >= 0 and j != pos and s >= threshold}
    return pairs


# ivf with k below the cluster sizes: its range rescan completes the lists; hnsw has no range
# search, so its recall is 1 only when k covers the biggest cluster.
@pytest.mark.parametrize("kind, k", [("ivf", 5), ("hnsw", 30)])
def test_approximate_index_keeps_the_flat_rows_where_its_recall_is_one(kind, k):
    vectors = clustered()
    settings = section_defaults("dedupe", {"ivf": {"nlist": 8, "nprobe": 8}})
    flat = duplicates.near_duplicates(vectors, 0.95, k=k, index="flat", collect=True)
    approx = duplicates.near_duplicates(vectors, 0.95, k=k, index=kind, settings=settings, collect=True)
    assert (~flat.keep).sum() > 100 and (flat.rescanned > 0) == (kind == "ivf")
    assert found_pairs(approx, 0.95) >= found_pairs(flat, 0.95)  # recall 1 (nprobe = nlist searches every cell)
    assert approx.keep.tolist() == flat.keep.tolist()
    assert [p[:2] for p in approx.pairs] == [p[:2] for p in flat.pairs]  # same kept row for each removed one
    assert np.allclose([p[2] for p in approx.pairs], [p[2] for p in flat.pairs], atol=1e-5)


def test_ivf_settings_reach_faiss():
    vectors = random_unit(2000)
    settings = section_defaults("dedupe", {"ivf": {"nlist": 20, "nprobe": 3}})
    index, device, rescan = duplicates.build_index(vectors, "ivf", settings)
    assert (index.nlist, index.nprobe, device) == (20, 3, "cpu") and rescan is index
    default, _, _ = duplicates.build_index(vectors, "ivf")
    assert default.nlist == duplicates.ivf_lists(2000, None) == 2000 // 39 and default.nprobe == 16


def test_hub_model_while_offline_is_a_clear_error():
    with pytest.raises(EnvironmentNotSupported, match=r"dedupe.model 'thenlper/gte-large' is a hub model name.*offline"):
        duplicates.resolve_model("thenlper/gte-large", offline=True)
    assert duplicates.resolve_model("default", offline=True).endswith("model")


TEXTS = [
    "The capital of France is Paris.",
    "Paris is the capital city of France.",
    "Photosynthesis converts sunlight into chemical energy in plants.",
    "Plants turn sunlight into chemical energy through photosynthesis.",
    "The stock market fell sharply on Monday.",
    "My favourite food is spicy noodle soup.",
    "To reverse a list in Python, use list.reverse() or slicing with [::-1].",
    "In Python you can reverse a list with slicing [::-1] or the reverse() method.",
    "Mount Everest is the highest mountain above sea level.",
]


@pytest.mark.parametrize("threshold", [0.9, 0.8])
def test_stage_at_two_thresholds_reports_pairs(tmp_path, embedder, threshold):
    from tunesmith.stages.dedupe import dedupe as stage

    frame = canon(TEXTS + [TEXTS[0]], [f"q{i}" for i in range(len(TEXTS))] + ["q0"])
    src = tmp_path / "f.parquet"
    frame.to_parquet(src)
    section = section_defaults("dedupe", {"threshold": threshold, "batch_size": 8, "neighbors": 5, "sample_pairs": 10})
    metrics = stage(str(src), section, str(tmp_path / "d.parquet"), str(tmp_path / "r.json"), str(tmp_path / "h.png"),
                    offline=True, model=embedder).metrics
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["exact_removed"] == 1 and report["near_removed"] >= 1
    assert report["rows_in"] == report["rows_out"] + report["exact_removed"] + report["near_removed"] == metrics["rows_in"]
    assert report["index_type"] == "flat" and report["embedding_dim"] == 384
    for pair in report["pairs_sample"]:
        assert pair["similarity"] >= threshold and pair["kept_id"] < pair["removed_id"]
        assert pair["kept_text"] and pair["removed_text"]
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    removed = {p["removed_id"] for p in report["pairs_sample"]}
    assert 8 not in removed and 5 not in removed  # unrelated texts stay


def test_exact_dedupe_folds_unicode_variants():
    """Six spellings of one row that differ only in Unicode form hash alike (issue: exact dedupe
    missed zero-width spaces, BOMs, NFD accents and fullwidth letters)."""
    from tunesmith.data.duplicates import normalise

    base = "Café au lait, please"
    variants = [
        base,
        "Caf\u00e9 au\u200b lait, please",           # zero-width space
        "\ufeffCafé au lait, please",                # BOM at the start
        "Café au\ufeff lait, please",                # embedded U+FEFF
        "Cafe\u0301 au lait, please",                # NFD accent
        "Ｃａｆé ａｕ ｌａｉｔ, ｐｌｅａｓｅ",           # fullwidth letters
    ]
    assert len({normalise(v) for v in variants}) == 1
    assert normalise("Café au lait, please!") != normalise(base)  # real differences stay


SHARED_TOOLFORMER = __import__("conftest").shared_data_dir() / "gpteacher" / "toolformer-dedupe-only.json"


def test_four_shards_keep_the_unsharded_counts_drops_and_rows(tmp_path, embedder, smollm2_dir, data_tokenizer,
                                                              monkeypatch):
    """dataset.shards: 4 tokenize_shard, filter_shard and embed_shard jobs (the stage functions the
    rules run), gathered by tokenize_count, filter and dedupe, give exactly the token counts, the
    filter report, the exact-dedupe digests and the kept rows of the unsharded stages, on real rows
    with real near duplicates across shards."""
    import pyarrow.parquet as pq

    from tunesmith.data import batches, duplicates
    from tunesmith.stages import dedupe as dedupe_stage, download as download_stage, embed_shard as embed_shard_stage, filter as filter_stage, filter_shard as filter_shard_stage, tokenize_count as tokenize_count_stage, tokenize_shard as tokenize_shard_stage

    if not SHARED_TOOLFORMER.exists():
        pytest.skip(f"shared data absent: {SHARED_TOOLFORMER}")
    monkeypatch.setattr(batches, "BATCH_ROWS", 32)  # raw row groups of 32: shard slices start and end inside them
    records = json.loads(SHARED_TOOLFORMER.read_text())[:160]
    rows = [{"q": r["instruction"], "a": r["response"]} for r in records]
    rows += [dict(r) for r in rows[:7]]  # exact copies: they shift the embedding shards' bounds
    for i in (5, 77, 150):
        rows[i]["a"] = "  "  # empty: filtered in shards 1, 2 and 4
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = str(tmp_path / "raw.parquet")
    download_stage.download(section_defaults("dataset", {"source": str(source), "columns": {"instruction": "q", "input": None,
                    "output": "a"}}), raw, str(tmp_path / "source.json"), offline=True)
    assert pq.ParquetFile(raw).metadata.num_row_groups == 6 and batches.num_rows(raw) == 167
    one, four = tmp_path / "one", tmp_path / "four"
    tok = section_defaults("tokenize")

    def shard_files(name, suffix):
        return [str(four / name / f"{i + 1}-of-4{suffix}") for i in range(4)]

    # token counts: 4 slices of raw counted, then gathered in order
    tokenize_count_stage.tokenize_count(raw, str(smollm2_dir), tok, str(one / "c.parquet"), str(one / "s.json"), str(one / "h.png"),
                          tokenizer=data_tokenizer)
    counts = shard_files("token_counts", ".parquet")
    for i, path in enumerate(counts):
        assert tokenize_shard_stage.tokenize_shard(raw, str(smollm2_dir), tok, i, 4, path, tokenizer=data_tokenizer).metrics["rows"] \
            == [41, 42, 42, 42][i]
    m = tokenize_count_stage.tokenize_count(raw, str(smollm2_dir), tok, str(four / "c.parquet"), str(four / "s.json"),
                              str(four / "h.png"), shards=counts)
    assert m.metrics["shards"] == 4 and m.metrics["rows_out"] == 167
    assert pq.read_table(one / "c.parquet").equals(pq.read_table(four / "c.parquet"))
    timing = ("count_seconds", "rows_per_s", "tokens_per_s")
    stats_one, stats_four = ({k: v for k, v in json.loads((d / "s.json").read_text()).items() if k not in timing}
                             for d in (one, four))
    assert stats_one == stats_four and stats_one["rows"] == 167

    # filter: 4 slices with their own counts; the gathered report is the unsharded one, byte for byte
    flt = section_defaults("filter", {"max_tokens": 120, "min_output_tokens": 8,
                                      "regex": [{"name": "no_urls", "pattern": "https?://", "field": "output"}]})
    filter_stage.filter_rows(raw, str(one / "c.parquet"), flt, str(one / "f.parquet"), str(one / "f.json"))
    parts, reports, digests = (shard_files("filtered", s) for s in (".parquet", ".report.json", ".digests.npz"))
    for i in range(4):
        filter_shard_stage.filter_shard(raw, counts[i], flt, i, 4, parts[i], reports[i], digests[i])
    filter_stage.gather_filtered(raw, str(four / "c.parquet"), parts, reports, flt, str(four / "f.parquet"),
                           str(four / "f.json"))
    assert (one / "f.json").read_bytes() == (four / "f.json").read_bytes()
    drops = json.loads((four / "f.json").read_text())["drops"]
    assert drops["empty"] == 3 and drops["max_tokens"] > 5 and drops["min_output_tokens"] > 0 and drops["regex:no_urls"] > 0, drops
    assert pq.read_table(one / "f.parquet").equals(pq.read_table(four / "f.parquet"))
    kept_rows = batches.num_rows(four / "f.parquet")

    # dedupe: exact on the shards' digests, near on the shards' embeddings of the rows after it
    section = section_defaults("dedupe", {"threshold": 0.9, "neighbors": 3, "batch_size": 32})
    dedupe_stage.dedupe(str(one / "f.parquet"), section, str(one / "d.parquet"), str(one / "r.json"), str(one / "h.png"),
                  offline=True, model=embedder)
    embeddings = shard_files("embeddings", ".npz")
    for i, path in enumerate(embeddings):
        embed_shard_stage.embed_shard(str(four / "f.parquet"), section, i, 4, path, offline=True, model=embedder,
                           digests=digests if i % 2 else None)  # with the filter shards' digests or hashing
    dedupe_stage.dedupe(str(four / "f.parquet"), section, str(four / "d.parquet"), str(four / "r.json"), str(four / "h.png"),
                  offline=True, model=embedder, embeddings=embeddings, digests=digests)
    unsharded, sharded = (json.loads((d / "r.json").read_text()) for d in (one, four))
    assert unsharded["rows_in"] == sharded["rows_in"] == kept_rows
    assert unsharded["exact_removed"] == sharded["exact_removed"] >= 4
    assert unsharded["near_removed"] == sharded["near_removed"] > 5
    assert sharded["embedding_shards"] == sharded["digest_shards"] == 4
    kept_one, kept_four = (load.read_rows(str(d / "d.parquet"))["id"].tolist() for d in (one, four))
    assert kept_one == kept_four
    assert [(p["kept_id"], p["removed_id"]) for p in unsharded["pairs_sample"]] == \
        [(p["kept_id"], p["removed_id"]) for p in sharded["pairs_sample"]]
    exact = dict(section, near=False)  # the streamed exact path reads the same digests
    for d, kw in ((one, {}), (four, {"digests": digests})):
        dedupe_stage.dedupe(str(d / "f.parquet"), exact, str(d / "x.parquet"), str(d / "x.json"), str(d / "xh.png"),
                      offline=True, **kw)
    assert pq.read_table(one / "x.parquet").equals(pq.read_table(four / "x.parquet"))
    assert {k: v for k, v in json.loads((four / "x.json").read_text()).items() if k != "digest_shards"} == \
        json.loads((one / "x.json").read_text())

    # a stale or misplaced shard is named
    with pytest.raises(DataError, match=r"3-of-4.npz: shard 2 of 3 holds rows .* \(\d+ vectors\), expected rows from \d+"):
        duplicates.gather_embeddings([embeddings[0], embeddings[2], embeddings[3]])
    with pytest.raises(DataError, match=r"2-of-4.parquet: shard 1 of 4 holds rows 41..83 of 167 \(42 counts\), "
                                        r"expected rows from 0 of 167 \(.*raw.parquet\): re-run its tokenize_shard job"):
        tokenize_count_stage.tokenize_count(raw, str(smollm2_dir), tok, str(tmp_path / "c.parquet"), str(tmp_path / "s.json"),
                              str(tmp_path / "h.png"), shards=[counts[1], counts[0], *counts[2:]])
    with pytest.raises(DataError, match=r"3-of-4.report.json: the shards end at row 125 of 167: a shard job is missing"):
        filter_stage.gather_filtered(raw, str(four / "c.parquet"), parts[:3], reports[:3], flt, str(tmp_path / "f.parquet"),
                               str(tmp_path / "f.json"))
    with pytest.raises(DataError, match=r"1-of-4.parquet: token counts of rows 0..41 of 167, filter shard 2/4 reads "
                                        r"rows 41..83 of 167 .*: re-run its tokenize_shard job"):
        filter_shard_stage.filter_shard(raw, counts[0], flt, 1, 4, *(str(tmp_path / n) for n in ("p.parquet", "r.json", "d.npz")))
    assert not (tmp_path / "f.parquet").exists() and not (tmp_path / "c.parquet").exists()


def _dry_run_jobs(tmp_path, shards, near=True, method="embedding"):
    import re

    from workflow_helpers import REPO, make_workdir, snakemake, write_config

    work = make_workdir(tmp_path)
    config = write_config(work, {
        "recipes": ["tiny-sweep"], "recipes_dir": str(REPO / "tests" / "recipes"),
        "overrides": {"tiny-sweep": {"dataset": {"source": str(REPO / "tests" / "data" / "tiny_reverse.jsonl"),
                                                 "shards": shards},
                                     "dedupe": {"near": near, "method": method}}},
    })
    proc = snakemake(work, config, "-n", "results/tiny-sweep/data/deduped.parquet", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}, proc.stdout


def test_shards_scatter_the_per_row_stages_into_jobs_and_one_shard_adds_none(tmp_path):
    import re

    counts, out = _dry_run_jobs(tmp_path / "four", 4)
    assert {k: counts[k] for k in ("tokenize_shard", "tokenize_count", "filter_shard", "filter", "embed_shard",
                                   "dedupe")} == {"tokenize_shard": 4, "tokenize_count": 1, "filter_shard": 4,
                                                  "filter": 1, "embed_shard": 4, "dedupe": 1}, counts
    for folder, suffix in (("token_counts", "parquet"), ("filtered", "digests.npz"), ("embeddings", "npz")):
        assert sorted(set(re.findall(rf"data/{folder}/(\d-of-4)\.{suffix}", out))) == \
            ["1-of-4", "2-of-4", "3-of-4", "4-of-4"], folder
    counts, _ = _dry_run_jobs(tmp_path / "one", 1)
    # the DAG of the default (one shard) is the one without sharding: no new job
    # (prepare_model only where resources/models lacks the base model)
    assert set(counts) - {"prepare_model"} == {"download", "tokenize_count", "filter", "dedupe", "total"}, counts
    counts, _ = _dry_run_jobs(tmp_path / "off", 4, near=False)  # nothing to embed; the per-row stages still scatter
    assert "embed_shard" not in counts and counts["tokenize_shard"] == counts["filter_shard"] == 4, counts
