"""Random-weight Llama models for GPU throughput checks (weights cannot travel to the GPU machine).

    python bench/gpu_make_models.py TOKENIZER_DIR OUT_DIR
writes OUT_DIR/smollm2-135m-random (SmolLM2-135M shape) and OUT_DIR/llama-1b-random (Llama-3.2-1B
shape with SmolLM2's 49152 vocab so the same tokenizer serves), bf16 safetensors + the tokenizer.
"""
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHAPES = {
    # The suite's CPU smoke (bench/gpu_check.py --tiny): every code path, in seconds.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, hidden_act="silu", head_dim=16),
    "smollm2-135m-random": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                                max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama-1b-random": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True,
                            max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                            hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2, head_dim=64),
}


def make_model(tok, out: Path, name: str) -> Path:
    """A random-weight Llama of shape `name`, bf16 safetensors, with `tok` saved beside it. The
    tokenizer's vocabulary may be smaller than the shape's (the LM head keeps the shape's size, so
    the compute is the shape's); its special tokens become the model's."""
    t = time.time()
    spec = dict(SHAPES[name])
    spec["vocab_size"] = max(spec["vocab_size"], len(tok))
    cfg = LlamaConfig(**spec)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    # A tokenizer whose turns end with a token other than EOS (tunesmith's own BPE: <|end|>) stops there too.
    ends = [tok.eos_token_id] + [i for i in [tok.convert_tokens_to_ids("<|end|>")]
                                 if i is not None and i != tok.unk_token_id and i != tok.eos_token_id]
    model.generation_config.eos_token_id = ends if len(ends) > 1 else tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out / name), safe_serialization=True)
    tok.save_pretrained(str(out / name))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n:,} parameters, saved in {time.time() - t:.1f} s", flush=True)
    del model
    return out / name


def main() -> None:
    tok_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    only = sys.argv[3:] or list(SHAPES)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    for name in only:
        make_model(tok, out, name)


if __name__ == "__main__":
    main()
