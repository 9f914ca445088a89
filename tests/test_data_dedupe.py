"""dedupe: exact hash, greedy keep order, faiss index kinds, the embedding model, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tunesmith.data import dedupe, load
from tunesmith.errors import EnvironmentNotSupported
from tunesmith.recipe import section_defaults


def canon(outputs, instructions=None):
    instructions = instructions or [f"task {i}" for i in range(len(outputs))]
    return load.to_frame([{"id": i, "instruction": ins, "input": "", "output": out, "system": "", "messages": [],
                           "text": ""} for i, (ins, out) in enumerate(zip(instructions, outputs))]).assign(n_tokens=3)


def test_exact_duplicates_are_normalised():
    frame = canon(["Hello  World", "hello world", "other"], ["Q", " q ", "Q"])
    keep, pairs = dedupe.exact_duplicates(frame)
    assert keep.tolist() == [True, False, True] and pairs == [(0, 1)]


def test_greedy_keep_drops_only_against_kept_earlier_rows():
    # 0 ~ 1 (0.95), 1 ~ 2 (0.95), 0 !~ 2: with 1 dropped, 2 stays (no kept earlier row is similar).
    sims = np.array([[1, .95, .5], [1, .95, .95], [1, .95, .5]], dtype=np.float32)
    ids = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    keep, pairs = dedupe.greedy_keep(sims, ids, 0.9)
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
    result = dedupe.near_duplicates(vectors, 0.9, k=5, index=kind)
    assert result.index_type == kind
    assert (~result.keep).sum() == 40 and result.keep[:400].all()
    assert all(removed - kept == 400 and sim >= 0.9 for kept, removed, sim in result.pairs)


def test_flat_rescan_finds_a_kept_row_beyond_k():
    # 12 identical vectors: with k=3 every row's neighbours are all above the threshold; row order decides.
    vectors = np.repeat(random_unit(1), 12, axis=0)
    result = dedupe.near_duplicates(vectors, 0.9, k=3, index="flat")
    assert result.keep.tolist() == [True] + [False] * 11


class GpuLikeIndex:
    """What faiss's GPU flat index offers the dedupe: search with k at most 2048, no range search."""

    def __init__(self, cpu_index):
        self.cpu = cpu_index

    def search(self, x, k):
        assert k <= dedupe.GPU_MAX_K, f"faiss GPU k-selection stops at 2048, asked {k}"
        return self.cpu.search(x, k)


def test_gpu_flat_index_caps_k_and_rescans_on_its_cpu_copy(monkeypatch):
    # A cluster bigger than k (and k above the GPU's cap): the GPU path searched without a rescan
    # used to keep rows the CPU path removes. Now it caps k and rescans on the CPU flat copy.
    vectors = np.vstack([np.repeat(random_unit(1, seed=3), 30, axis=0), random_unit(20, seed=4)])
    cpu = dedupe.near_duplicates(vectors, 0.9, k=3, index="flat")
    real_build = dedupe.build_index

    def on_gpu(vecs, kind):
        index, _, flat = real_build(vecs, kind)
        return GpuLikeIndex(index), "gpu", flat

    monkeypatch.setattr(dedupe, "build_index", on_gpu)
    gpu = dedupe.near_duplicates(vectors, 0.9, k=3, index="flat")
    assert gpu.index_device == "gpu"
    assert gpu.keep.tolist() == cpu.keep.tolist() == [True] + [False] * 29 + [True] * 20
    many = random_unit(2100, seed=5)
    index, _, _ = real_build(many, "flat")
    sims, ids = dedupe.neighbours(GpuLikeIndex(index), many, 3000, "gpu")
    assert sims.shape == ids.shape == (2100, dedupe.GPU_MAX_K)


def test_auto_index_switches_to_approximate_beyond_100k():
    assert dedupe.index_kind(100_000) == "flat" and dedupe.index_kind(100_001) == "hnsw"
    assert dedupe.index_kind(10, "ivf") == "ivf"


def test_hub_model_while_offline_is_a_clear_error():
    with pytest.raises(EnvironmentNotSupported, match=r"dedupe.model 'thenlper/gte-large' is a hub model name.*offline"):
        dedupe.resolve_model("thenlper/gte-large", offline=True)
    assert dedupe.resolve_model("default", offline=True).endswith("model")


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
    from tunesmith.data.stages import dedupe as stage

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
    from tunesmith.data.dedupe import normalise

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
