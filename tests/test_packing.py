"""Packing is correct on CPU: with `packing: true` trl packs examples padding-free (one row, position
ids restarting at each example) and transformers 5 turns restarting position ids into a
block-diagonal mask for sdpa and eager attention. The loss of a packed batch equals the sum of the
per-example losses; the same tokens packed without the restart (one long document) do not."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_sum_of_per_example_losses(tiny_llama_dir, attn):
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (11, 7, 15):
        ids = torch.randint(10, 2000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})  # prompt masked, as SFT has it

    def summed_loss(batch):
        # use_cache=False as in training (trl's compute_loss sets it): transformers looks for packed
        # position ids only when there is no cache.
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")

    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert packed["input_ids"].shape == (1, 33) and "attention_mask" not in packed
    with torch.no_grad():
        separate = sum(summed_loss(DataCollatorForLanguageModeling(pad_token_id=0)([e])) for e in examples)
        together = summed_loss(packed)
        # Shift inside the packed row: the first label of each next example is masked (-100), so
        # no target crosses a boundary; the attention is what this compares.
        leaky = summed_loss({"input_ids": packed["input_ids"], "labels": packed["labels"],
                             "position_ids": torch.arange(33).unsqueeze(0)})
    assert together.item() == pytest.approx(separate.item(), rel=1e-5)
    assert abs(leaky.item() - separate.item()) > 1e-3  # examples attending to each other would show


def test_the_train_stage_packs_padding_free(section_factory, tmp_path):
    """train.args.packing: true reaches trl as packing with a padding-free strategy: the collator
    then sends the restarting position ids, and no attention mask, that the test above relies on."""
    from trl import SFTConfig

    from tunesmith.objectives import sft
    from tunesmith.trainer import training_arguments

    args = section_factory("lora", packing=True)["train"]["args"]
    config = training_arguments(SFTConfig, args, optim="adamw_torch", gradient_checkpointing=False,
                                output_dir=tmp_path, cuda=False, has_eval=False, **sft.config_kwargs(args, {}))
    assert config.packing and config.packing_strategy in ("bfd", "bfd_split")
