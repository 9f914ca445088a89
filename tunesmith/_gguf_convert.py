"""Run llama.cpp's convert_hf_to_gguf.py with one documented change (subprocess entry point).

    python -m tunesmith._gguf_convert <llama.cpp dir> <fallback pre-tokenizer|-> -- <converter args>

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a fixed test string
and refuses hashes it does not know ("BPE pre-tokenizer was not recognized"). Every tokenizer we
train ourselves (the pretrain path) is new to it, so the refusal is certain. With a fallback
name, an unknown hash maps to that name instead (`gpt-2` is the pre-tokenizer of a ByteLevel
BPE; llama.cpp loads it, while `gpt2` is not a name it knows). Known tokenizers are untouched.
The choice is printed so the quantize log shows it.

Second change: the converter tries SentencePiece first for Llama models and imports the
sentencepiece package before it looks for tokenizer.model; without that package installed the
ImportError stops it instead of the FileNotFoundError it expects before falling back to the
tokenizer.json (BPE) path. Folders without tokenizer.model skip straight to that fallback.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    conv_dir, fallback = Path(argv[0]), argv[1]
    args = argv[3:] if len(argv) > 2 and argv[2] == "--" else argv[2:]
    # The converter must use its own gguf-py: PyPI's gguf is older than it.
    sys.path.insert(0, str(conv_dir / "gguf-py"))
    sys.path.insert(0, str(conv_dir))
    import conversion.base as base

    if fallback != "-":
        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):  # type: ignore[no-untyped-def]
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                print(f"tunesmith: BPE pre-tokenizer not recognized by llama.cpp; writing "
                      f"tokenizer.ggml.pre = {fallback!r} (recipe pretrain.tokenizer.gguf_pre_tokenizer)",
                      file=sys.stderr, flush=True)
                return fallback

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    original_sp = base.TextModel._set_vocab_sentencepiece

    def _set_vocab_sentencepiece(self, *a, **k):  # type: ignore[no-untyped-def]
        if not (Path(self.dir_model) / "tokenizer.model").is_file():
            raise FileNotFoundError("no tokenizer.model")
        return original_sp(self, *a, **k)

    base.TextModel._set_vocab_sentencepiece = _set_vocab_sentencepiece

    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
