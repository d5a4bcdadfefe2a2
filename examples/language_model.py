"""Watch Neural Collapse of next-token prediction in a small causal transformer, on a CPU, offline.

Run ``python examples/language_model.py`` (or ``make demo-lm``), then ``tensorboard --logdir runs``. The text is
the Python reference manual that ships with Python itself (``pydoc_data.topics``, about 465,000 characters); a
byte-level BPE is trained on it locally with the ``tokenizers`` package (no download), and a GPT-style model
learns to predict the next token. :class:`~lightning_neural_collapse.NeuralCollapseCallback` treats every
position as a sample (its class is the next token) and measures a window of training steps at a time, as
"Linguistic Collapse" (Wu & Papyan, NeurIPS 2024) does for language models, which train about one epoch and
never reach zero training error:

- **CDNV** (``nc1_cdnv``): within-token variability relative to the distance between token means; Wu & Papyan
  see it fall steadily with training and scale.
- **NCC mismatch** (``nc4_ncc_mismatch_prev_means``): how often the model's next-token choice differs from the
  nearest token mean (of the previous window).
- **GNC2** (``nc2_log_energy_means``) and **UNC3** (``nc3_cosine_cov``): hyperspherical uniformity of the means
  and the uniformity of the classifier-mean alignment, the two measures Wu & Papyan find telling when, as
  here, there are far more classes than dimensions (a simplex ETF is impossible).

Choices: batches in the Hugging Face style (``input_ids``, ``attention_mask``, ``labels`` equal to the inputs),
and the model's class name ends in ``ForCausalLM`` as Hugging Face models do, so the callback shifts the labels
itself (``shift_labels`` automatic; it says so). The head is tied to the input embedding, as in GPT-2 (it says
that too). A vocabulary of 1,024 BPE tokens, width 96, two transformer blocks, sequences of 64 tokens, AdamW with
a cosine schedule: a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_neural_collapse import NeuralCollapseCallback

#: Columns of the summary: (label, key in the callback's history).
COLUMNS = [
    ("train err", "train_error"),
    ("CDNV", "nc1_cdnv"),
    ("NC1", "nc1"),
    ("NCC mismatch", "nc4_ncc_mismatch_prev_means"),
    ("GNC2", "nc2_log_energy_means"),
    ("UNC3", "nc3_cosine_cov"),
]


def python_manual() -> list[str]:
    """The reference manual's topics, one string each (Python's own ``pydoc_data``: nothing to download)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE trained here on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class Chunks(Dataset):
    """Consecutive chunks of ``length`` tokens as Hugging-Face-style dicts (``labels`` = ``input_ids``)."""

    def __init__(self, ids: Tensor, length: int) -> None:
        self.ids, self.length = ids, length

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        chunk = self.ids[index * self.length : (index + 1) * self.length]
        return {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}


class TinyGPTForCausalLM(nn.Module):
    """Token and position embeddings, pre-norm transformer blocks with a causal mask, a final norm, and an
    ``lm_head`` tied to the token embedding. Its loss shifts the labels, as a Hugging Face causal LM's does."""

    def __init__(self, vocab: int, width: int, depth: int, heads: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(length, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None) -> Any:
        steps = input_ids.shape[1]
        x = self.embed(input_ids) + self.position(torch.arange(steps, device=input_ids.device))
        h = self.norm(self.blocks(x, mask=self.causal[:steps, :steps], is_causal=True))  # chunks have no padding
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return {"logits": logits, "loss": loss}


class LanguageModel(L.LightningModule):
    """AdamW with a short warm-up and a cosine decay; logs the training and validation loss."""

    def __init__(self, vocab: int, width: int, depth: int, heads: int, length: int, lr: float, steps: int) -> None:
        super().__init__()
        self.model = TinyGPTForCausalLM(vocab, width, depth, heads, length)
        self.lr, self.total_steps = lr, steps
        self.val_loss: dict[int, float] = {}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch)["loss"]
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch)["loss"], prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if "val_loss" in self.trainer.callback_metrics and not self.trainer.sanity_checking:
            self.val_loss[self.current_epoch] = float(self.trainer.callback_metrics["val_loss"])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, betas=(0.9, 0.95))
        warmup = max(1, self.total_steps // 20)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, self.total_steps - warmup))))

        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step"},
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (the number of classes)")
    p.add_argument("--width", type=int, default=96, help="model width D (the feature dimension)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--length", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--window", type=int, default=20, help="measure every this many training steps")
    p.add_argument("--max-chars", type=int, default=0, help="use only the first characters of the manual (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--logdir", default="./runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress-bar", action="store_true")
    return p.parse_args(argv)


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def format_summary(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    header = ["", "window", "step"] + [label for label, _ in COLUMNS]
    table = [header] + [
        [name, str(r["window"]), str(r["step"])] + [_fmt(r.get(key)) for _, key in COLUMNS] for name, r in rows.items()
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for i, row in enumerate(table):
        lines.append(
            "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        f"{summary['vocab']} token classes, {summary['tokens']:,} training tokens, D = {summary['width']}; "
        f"validation loss {_fmt(summary['val_loss_first'])} -> {_fmt(summary['val_loss_last'])}.",
        f"CDNV fell {_fmt(summary['cdnv_ratio'])}x from the first window to the last (first/last ratio).",
        f"Figure:   {summary['figure_path'] or '(not saved)'}",
        f"Wall time: {summary['wall_time_s']:.1f} s",
        f"See it all with:  tensorboard --logdir {os.path.abspath(summary['logdir'])}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    texts = python_manual()
    if args.max_chars:
        texts = ["".join(texts)[: args.max_chars]]
    tokenizer = train_tokenizer(texts, args.vocab)
    vocab = tokenizer.get_vocab_size()
    ids = torch.tensor([i for text in texts for i in tokenizer.encode(text).ids], dtype=torch.long)
    split = int(0.95 * len(ids))
    train, val = Chunks(ids[:split], args.length), Chunks(ids[split:], args.length)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    steps = args.epochs * len(train_loader)
    model = LanguageModel(vocab, args.width, args.depth, args.heads, args.length, args.lr, steps)
    nc = NeuralCollapseCallback(every_n_train_steps=args.window)
    logger = TensorBoardLogger(save_dir=args.logdir, name="language_model")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[nc],
        log_every_n_steps=args.window,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress_bar,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader, DataLoader(val, batch_size=args.batch_size))
    wall = time.perf_counter() - start
    first, last = nc.history[0], nc.history[-1]
    measured = [r for r in nc.history if "nc4_ncc_mismatch_prev_means" in r]
    rows = {"first window": first, "second window": measured[0] if measured else first, "last window": last}
    cdnv = (first.get("nc1_cdnv"), last.get("nc1_cdnv"))
    summary = {
        "rows": {name: dict(row) for name, row in rows.items()},
        "vocab": vocab,
        "tokens": len(train) * args.length,
        "width": args.width,
        "windows": len(nc.history),
        "cdnv_ratio": cdnv[0] / cdnv[1] if None not in cdnv and cdnv[1] else None,
        "val_loss_first": model.val_loss.get(min(model.val_loss, default=0)),
        "val_loss_last": model.val_loss.get(max(model.val_loss, default=0)),
        "figure_path": os.path.abspath(nc.figure_path) if nc.figure_path else None,
        "log_dir": os.path.abspath(logger.log_dir),
        "logdir": args.logdir,
        "wall_time_s": wall,
        "args": vars(args),
    }
    os.makedirs(logger.log_dir, exist_ok=True)
    with open(os.path.join(logger.log_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print()
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
