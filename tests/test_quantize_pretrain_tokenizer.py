"""The pretrain path's tokenizer through llama.cpp: a freshly trained ByteLevel BPE is unknown to
the converter ("BPE pre-tokenizer was not recognized"); with the recipe's fallback name (gpt-2)
it converts, loads in llama.cpp and tokenises like HF. ~1 min."""

from __future__ import annotations

import random

import pytest

from tunesmith import quantization
from tunesmith.errors import TunesmithError

WORDS = ("the a cat dog sat on mat ran fast slow red blue green house tree river sun moon star "
         "big small happy sad jumps over lazy quick brown fox 1 2 3 42 2024 it's don't I'll").split()
CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
        "{% else %}<|bot|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|bot|>{% endif %}")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("pretrain")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(400)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(docs) + "\n")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<|user|>", "<|bot|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(docs, trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=specials[4:], model_max_length=256)
    fast.chat_template = CHAT
    model_dir = root / "model"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=256, bos_token_id=fast.bos_token_id,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return model_dir, corpus


@pytest.mark.slow
def test_fresh_bpe_is_refused_without_the_fallback(tmp_path, pretrained_dir):
    model_dir, _ = pretrained_dir
    with pytest.raises(TunesmithError, match="BPE pre-tokenizer was not recognized"):
        quantization.convert(model_dir, tmp_path / "f16.gguf", pre_tokenizer_fallback=None)


@pytest.mark.slow
def test_fresh_bpe_converts_with_gpt2_pre_tokenizer_and_loads(tmp_path, pretrained_dir):
    model_dir, corpus = pretrained_dir
    report = quantization.export(model_dir, tmp_path / "gguf", types=["Q8_0"], smoke_prompt="the cat",
                             corpus={"source": str(corpus), "text_column": "text"}, n_texts=8, max_tokens=48,
                             pre_tokenizer_fallback="gpt-2")
    assert report["converter"]["pre_tokenizer_fallback"] == "gpt-2"
    assert report["texts"]["source"] == str(corpus) and report["texts"]["count"] == 8
    for name, info in report["files"].items():
        assert info["tokenization_agreement"] == 1.0, (name, info["tokenization_first_mismatch"])
        assert info["chat_template_matches_training"], name
        assert info["smoke"]["tokens"] > 0, name
    # random weights give near-ties in the logits, so KL is the sharper check than top-1 here
    assert report["files"]["F16"]["mean_kl"] < 1e-3 and report["files"]["F16"]["top1_agreement"] >= 0.95
