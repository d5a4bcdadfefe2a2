"""A small classifier on generated, well separated data: reaches zero training error in a few epochs."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "logger": False,
    "num_sanity_val_steps": 0,
}
"""Trainer arguments of the tests: CPU, no progress bar, summary, checkpoints, logger or sanity check."""


def blobs(num_samples: int = 200, num_classes: int = 4, dim: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(features, labels)``: Gaussian blobs around well separated random centres (float32, int64)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_samples) % num_classes
    features = centres[labels] + torch.randn(num_samples, dim, generator=g)
    return features, labels


class NoisyDataset(Dataset):
    """Adds fresh random noise on every access: consumes the global RNG like a data augmentation."""

    def __init__(self, features: Tensor, labels: Tensor, noise: float = 0.05) -> None:
        self.features, self.labels, self.noise = features, labels, noise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.features[index] + self.noise * torch.randn_like(self.features[index]), self.labels[index]


class ToyClassifier(L.LightningModule):
    """MLP body (with BatchNorm and Dropout) and a linear classifier ``fc``."""

    def __init__(
        self, in_dim: int = 10, width: int = 32, num_classes: int = 4, lr: float = 0.1, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_dim, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, width),
            nn.ReLU(),
        )
        self.fc = nn.Linear(width, num_classes)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class ToyData(L.LightningDataModule):
    """Blobs as a datamodule (for LightningCLI)."""

    def __init__(self, num_samples: int = 200, batch_size: int = 32) -> None:
        super().__init__()
        self.num_samples, self.batch_size = num_samples, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*blobs(self.num_samples)), batch_size=self.batch_size, shuffle=True)


def second_item(batch: Any) -> Any:
    """A label getter referenced by import path in the CLI test."""
    return batch[1]


class ValidatedClassifier(ToyClassifier):
    """:class:`ToyClassifier` with a validation step that logs ``val_loss`` (per dataloader with several)."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("val_loss", loss, on_epoch=True)
        return loss
