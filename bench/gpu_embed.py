"""Embedding throughput of the dedupe stage's embedder, and exact top-k self-search on the GPU.

    python bench/gpu_embed.py MODEL_DIR GSM8K_JSONL [--rows 100000] [--device cuda] [--out f.json]

Texts: GSM8K questions, repeated with small perturbations (a word dropped, a number changed,
a suffix) until --rows rows. Embeds with tunesmith.data.duplicates.embed (the stage's own call:
sentence-transformers encode, normalised, float32 out) at the stage's default batch size 64 and at
larger ones, fp32 and fp16. Then exact inner-product top-k (k=11: self + 10) of all rows against all
rows with torch matmul + topk on the GPU, in query chunks: NOT faiss, for reference only.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def texts_from(path: str, rows: int, seed: int = 0) -> list[str]:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        base = [json.loads(line)["question"] for line in fh if line.strip()]
    rng = random.Random(seed)
    out = list(base)
    while len(out) < rows:
        t = rng.choice(base)
        words = t.split()
        kind = rng.randrange(3)
        if kind == 0 and len(words) > 4:
            del words[rng.randrange(len(words))]
            t = " ".join(words)
        elif kind == 1:
            t = re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randrange(1, 9)), t, count=1)
        else:
            t = t + rng.choice([" Explain.", " Show your work.", " Answer briefly.", " Think step by step."])
        out.append(t)
    return out[:rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("gsm8k")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="64,256,1024")
    ap.add_argument("--fp16", action="store_true", help="also time the model in fp16")
    ap.add_argument("--topk", action="store_true")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from tunesmith.data.duplicates import embed

    cuda = opts.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    texts = texts_from(opts.gsm8k, opts.rows)
    lengths = [len(t.split()) for t in texts]
    t0 = time.perf_counter()
    model = SentenceTransformer(opts.model, device=opts.device, local_files_only=True)
    load_s = time.perf_counter() - t0
    print(f"rows {len(texts)}, words/row mean {np.mean(lengths):.1f}; model load {load_s:.1f} s; "
          f"max_seq_length {model.max_seq_length}; device {opts.device}"
          f"{' ' + torch.cuda.get_device_name(0) if cuda else ''}; torch threads {torch.get_num_threads()}", flush=True)
    results = {"rows": len(texts), "words_per_row": float(np.mean(lengths)), "device": opts.device, "runs": []}
    embed(model, texts[:2048], batch_size=64)  # warm-up
    vectors = None
    variants = [("fp32", int(b)) for b in opts.batches.split(",")]
    if opts.fp16:
        variants += [("fp16", int(b)) for b in opts.batches.split(",")]
    for dtype, bs in variants:
        if dtype == "fp16" and next(model.parameters()).dtype != torch.float16:
            model.half()
            embed(model, texts[:2048], batch_size=64)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        v = embed(model, texts, batch_size=bs)
        sync()
        dt = time.perf_counter() - t0
        row = {"dtype": dtype, "batch_size": bs, "seconds": dt, "rows_per_second": len(texts) / dt,
               "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
        if vectors is None:
            vectors = v
        else:
            row["max_abs_diff_vs_first"] = float(np.abs(v - vectors).max())
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    if opts.topk and cuda:
        for dt_name, dt in (("fp32", torch.float32), ("fp16", torch.float16)):
            x = torch.from_numpy(vectors).to("cuda", dt)
            k, chunk = 11, 8192
            for rep in range(2):  # first pass warms up
                sync()
                t0 = time.perf_counter()
                sims, ids = [], []
                for i in range(0, len(x), chunk):
                    s, j = torch.topk(x[i:i + chunk] @ x.T, k, dim=1)
                    sims.append(s)
                    ids.append(j)
                sims = torch.cat(sims).cpu().numpy()
                ids = torch.cat(ids).cpu().numpy()
                sync()
                secs = time.perf_counter() - t0
            self_first = float((ids[:, 0] == np.arange(len(ids))).mean())
            row = {"topk": f"torch matmul+topk {dt_name} (not faiss)", "n": len(x), "dim": int(x.shape[1]),
                   "k": k, "seconds_incl_copy_back": secs, "self_is_first": self_first,
                   "rows_with_neighbour_ge_0.95": int((sims[:, 1] >= 0.95).sum())}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
