"""model.attn_implementation and packing (tunesmith.attention): every kernel that runs on CPU keeps
packed documents apart (packed loss == the per-document losses to 1e-5, padded to one row length
as the stage pads for flex attention), auto picks a kernel per batch shape, and a model that lets
packed documents attend to each other is refused naming the keys. Tiny models built from configs."""

from __future__ import annotations

import pytest
import torch

from tunesmith import attention
from tunesmith.errors import TunesmithError


def tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (11, 7, 15):
        ids = torch.randint(10, 500, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})  # prompt masked, as SFT has it
    return out


def summed_loss(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_loss_equals_unpacked_loss(attn):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = tiny_llama(attn)
    rows = examples()
    # One fixed row length, as tunesmith.speed pads packed micro-batches for flex attention.
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=64)(rows)
    assert packed["input_ids"].shape == (1, 64) and "attention_mask" not in packed
    with torch.no_grad():
        separate = sum(summed_loss(model, DataCollatorForLanguageModeling(pad_token_id=0)([r])) for r in rows)
        together = summed_loss(model, packed)
    assert together.item() == pytest.approx(separate.item(), rel=1e-5)
    # The stage's own check agrees: nothing crosses a document boundary. Same padded row length: a
    # second shape makes flex recompile with dynamic shapes, which inductor's CPU code generation
    # fails on in torch 2.13 (CppCompileError, cur_qSplitSize2): one more reason the stage pads.
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=64)
    assert attention.check_isolation(model, collator) < 1e-4


def test_a_model_that_lets_packed_documents_attend_to_each_other_is_refused():
    """OPT builds its own causal mask and ignores restarting position ids (transformers 5.23), so
    packed documents see each other with sdpa; the check before step one refuses it."""
    from transformers import OPTConfig, OPTForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    model = OPTForCausalLM._from_config(OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64),
                                        attn_implementation="sdpa")
    model.train()
    with pytest.raises(TunesmithError, match=r"model\.attn_implementation and train\.args\.packing.*OPTForCausalLM"):
        attention.check_isolation(model, DataCollatorForLanguageModeling(pad_token_id=1, padding_free=True))
    assert model.training  # the check puts the model back as it found it


def test_auto_picks_a_kernel_for_the_batch_shape():
    padded = attention.choose("auto", packing=False, cuda=True)
    assert padded.implementation == "sdpa" and not padded.static_row
    on_cpu = attention.choose("auto", packing=True, cuda=False)
    assert on_cpu.implementation == "sdpa" and "CPU" in on_cpu.reason
    packed = attention.choose("auto", packing=True, cuda=True)
    if attention.flash_attn_installed():
        assert packed.implementation == "flash_attention_2"
    else:  # this CPU machine: flex attention, one padded row length so it compiles once
        assert packed.implementation == "flex_attention" and packed.static_row
    assert attention.choose("auto", packing=True, cuda=True, method="unsloth").implementation == "unsloth"
    assert attention.choose("eager", packing=True, cuda=False).implementation == "eager"


def test_unusable_choices_fail_at_once_naming_the_key():
    with pytest.raises(TunesmithError, match="model.attn_implementation flash_attention_2 needs CUDA"):
        attention.choose("flash_attention_2", packing=True, cuda=False)
    with pytest.raises(TunesmithError, match="unknown"):
        attention.choose("xformers", packing=False, cuda=False)


def test_the_stage_loads_the_chosen_kernel(tmp_path, section_factory):
    """methods loads the model with the resolved kernel and keeps the choice for the trainer loop."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from tunesmith import methods

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")),
                                  pad_token="<pad>", unk_token="<unk>")
    section = section_factory("full", packing=True)
    section["model"]["attn_implementation"] = "eager"
    model = methods.load_full(tmp_path / "m", section, False, tok, False)
    assert model.config._attn_implementation == "eager" and model._tunesmith_attention.implementation == "eager"
    section["model"]["attn_implementation"] = "auto"
    section["train"]["args"]["packing"] = False
    assert methods.load_full(tmp_path / "m", section, False, tok, False).config._attn_implementation == "sdpa"
    del AutoTokenizer
