"""Parity with TRL's KTOTrainer: the same batch through both gives the same loss (TRL is a test-only dependency)."""

from __future__ import annotations

import json

import pytest
import torch

from aligner.loss import kto_loss
from aligner.model import completion_logps, load_policy, load_tokenizer
from tests.aligner.support import synthetic_rows

trl = pytest.importorskip("trl")


def _split(ids: torch.Tensor, attn: torch.Tensor, comp: torch.Tensor) -> tuple[list[int], list[int]]:
    keep = attn.bool()
    ids, comp = ids[keep].tolist(), comp[keep].bool().tolist()
    start = comp.index(True)
    return ids[:start], ids[start:]


@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (1.3, 1.0)])
def test_loss_matches_trl_kto_trainer(tiny_model_dir, tmp_path, lambdas):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    tok = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir, dtype=torch.float32)
    rows = synthetic_rows(5, 3, seed=7)
    data = Dataset.from_list([{"prompt": json.loads(r["messages"]),
                               "completion": [{"role": "assistant", "content": r["completion"]}],
                               "label": r["label"]} for r in rows])
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, bf16=False, report_to=[],
                     max_length=256, desirable_weight=lambdas[0], undesirable_weight=lambdas[1], beta=0.1,
                     use_cpu=True)
    trainer = KTOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    model = trainer.model  # whatever TRL wraps or patches is what both sides use
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter, so rewards and z0 are not all zero
        for n, p in model.named_parameters():
            if "lora_B" in n and ".default." in n:  # not TRL's frozen "ref" copy, if it made one
                p.normal_(0, 0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, False).item()

    pairs = [_split(*t) for t in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                     strict=True)]
    kl_pairs = [_split(*t) for t in zip(batch["KL_input_ids"], batch["KL_attention_mask"],
                                        batch["KL_completion_mask"], strict=True)]
    with torch.no_grad():
        pol = completion_logps(model, pairs, tok.pad_token_id, autocast=False)
        pol_kl = completion_logps(model, kl_pairs, tok.pad_token_id, autocast=False)
        with model.disable_adapter():
            ref = completion_logps(model, pairs, tok.pad_token_id, autocast=False)
            ref_kl = completion_logps(model, kl_pairs, tok.pad_token_id, autocast=False)
    ours = kto_loss(pol - ref, pol_kl - ref_kl, torch.as_tensor(batch["label"]).bool(), 0.1, *lambdas)
    assert (pol - ref).abs().max() > 1e-2, "the comparison must involve non-trivial rewards"
    assert ours.loss.item() == pytest.approx(trl_loss, abs=1e-5)
