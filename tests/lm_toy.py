"""A tiny causal language model in the Hugging Face style, and token data with padding, for the tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

VOCAB, WIDTH, LENGTH = 24, 16, 12


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Tensor | None


class TinyForCausalLM(nn.Module):
    """Embedding, a causal mixing of the previous positions, a final norm and an ``lm_head``. Like a Hugging Face
    ``*ForCausalLM``, it takes ``labels`` equal to the inputs (``-100`` at padding) and shifts them in its loss."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def hidden(self, input_ids: Tensor) -> Tensor:
        """``(B, T, D)``: each position sees its own token and the mean of the earlier ones."""
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        context = x.cumsum(dim=1) / steps
        return self.norm(torch.tanh(self.mix(torch.cat([x, context], dim=-1))))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> CausalLMOutput:
        logits = self.lm_head(self.hidden(input_ids))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(logits, loss)


class LM(L.LightningModule):
    """Trains ``self.model`` on Hugging-Face-style dict batches (``fused``: the loss from the final norm's output
    and the head's weight, without calling the head, as fused linear-cross-entropy kernels do)."""

    def __init__(self, lr: float = 0.5, tied: bool = False, fused: bool = False) -> None:
        super().__init__()
        self.model = TinyForCausalLM(tied=tied)
        self.lr, self.fused = lr, fused

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids, attention_mask).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.fused:
            h = self.model.hidden(batch["input_ids"])
            logits = h @ self.model.lm_head.weight.T
            return nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
            )
        out = self.model(**batch)
        assert out.loss is not None
        return out.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(**batch)
        assert out.loss is not None
        self.log("val_loss", out.loss)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Sequences(Dataset):
    """Token sequences following a few fixed patterns (learnable), with right padding: ``labels`` are the inputs
    with ``-100`` at padding, and ``attention_mask`` is 0 there."""

    def __init__(self, count: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (count,), generator=g)
        steps = torch.randint(1, 4, (count,), generator=g)
        self.ids = (starts[:, None] + steps[:, None] * torch.arange(LENGTH)[None, :]) % VOCAB
        self.lengths = torch.randint(LENGTH - 4, LENGTH + 1, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        mask = (torch.arange(LENGTH) < self.lengths[index]).long()
        ids = torch.where(mask.bool(), self.ids[index], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def token_samples(module: LM, data: Dataset, shift: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The test's own extraction: every position with a target, its final-norm features, its next-token label
    and the logits, in float64, from the model in eval mode."""
    batch: dict[str, Any] = {key: torch.stack([data[i][key] for i in range(len(data))]) for key in data[0]}
    was_training = module.training
    module.eval()
    with torch.no_grad():
        h = module.model.hidden(batch["input_ids"]).double()
        logits = module.model.lm_head(h.float()).double()
    module.train(was_training)
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    if shift:
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        mask = mask & torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    keep = mask & (labels != -100)
    return h[keep], labels[keep], logits[keep]
