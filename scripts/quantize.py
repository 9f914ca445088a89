"""Entry for the quantize rule: F16 + quantized GGUFs with llama.cpp's own tools, each loaded back and checked."""
from pathlib import Path

from tunesmith import quantize, settings, tracking
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    section = io.params["section"]
    q, pretrain = section["quantize"], section.get("pretrain") or {}
    out = io.output["gguf"]
    eval_jsonl = io.input.get("eval") or None  # an empty list (pretrain-only) arrives as []
    if isinstance(eval_jsonl, list):
        eval_jsonl = eval_jsonl[0] if eval_jsonl else None
    with tracking.stage_run("quantize", io.params, io.input, io.output, recipe=io.params["recipe"],
                            variant=io.params.get("variant"), results_dir=settings.results_dir(),
                            section=section) as rec:
        report = quantize.export(
            io.input["model"], out, types=q["types"], smoke_prompt=q["smoke_prompt"],
            eval_jsonl=eval_jsonl, corpus=pretrain.get("corpus"),
            pre_tokenizer_fallback=(pretrain.get("tokenizer") or {}).get("gguf_pre_tokenizer", "gpt-2"),
            n_texts=q.get("check_texts", 16), max_tokens=q.get("check_max_tokens", 128),
            threads=io.threads, log_file=io.log)
        for qtype, entry in report["files"].items():
            rec.log_metrics({
                f"gguf.{qtype}.size_bytes": entry["size_bytes"],
                f"gguf.{qtype}.top1_agreement": entry["top1_agreement"],
                f"gguf.{qtype}.mean_kl": entry["mean_kl"],
                f"gguf.{qtype}.perplexity": entry["perplexity"],
                f"gguf.{qtype}.tokenization_agreement": entry["tokenization_agreement"],
                f"gguf.{qtype}.k_quant_fallback_tensors": (entry.get("k_quant_fallback") or {}).get("count", 0),
            })
            # The GGUFs themselves are too big for the artifact store: their paths go in as tags.
            rec.set_tag(f"gguf.{qtype}.path", str(Path(out, entry["file"]).resolve()))
        rec.set_tag("gguf.pre_tokenizer_fallback", report["converter"]["pre_tokenizer_fallback"] or "")
        rec.log_artifact(Path(out) / "report.json")
        rec.log_artifact(Path(out) / "smoke.txt")
    for qtype, entry in report["files"].items():
        print(f"{qtype}: {entry['size_bytes'] / 1e6:.1f} MB  top-1 {entry['top1_agreement']:.3f}  "
              f"KL {entry['mean_kl']:.4g}  tokenization {entry['tokenization_agreement']:.2f}")


if __name__ == "__main__":
    run(main, "quantize")
