"""``pipeline.labels``: labels and model inputs from batches, and the one definition of a counted sample."""

from __future__ import annotations

import pytest
import torch

from lightning_neural_collapse.pipeline.labels import (
    BatchFormatError,
    ClassCountError,
    LabelReader,
    call_model,
    check_targets,
    class_indices,
    counted_samples,
    default_input_getter,
    default_label_getter,
)


def test_class_indices_mark_ignored_and_invalid_without_raising() -> None:
    labels = class_indices(torch.tensor([0, 2, -100, 5, -3]), 3, ignore_index=-100)
    assert labels.tolist() == [0, 2, -1, 3, 3]
    soft = torch.tensor([[0.2, 0.8], [1.0, 1.0], [float("nan"), 1.0], [-0.5, 1.5]])
    assert class_indices(soft, 2).tolist() == [1, 2, 2, 2]
    assert class_indices(torch.zeros(4, 1, dtype=torch.long), 3).tolist() == [3, 3, 3, 3]  # column labels
    assert class_indices(torch.ones(4, 5), 3).tolist() == [3] * 4  # soft targets of another width


def test_counted_samples_is_label_and_finiteness() -> None:
    features = torch.tensor([[1.0], [2.0], [float("inf")], [3.0], [4.0]])
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, -1, 2])
    assert counted_samples(labels, 2, features).tolist() == [True, True, False, False, False]
    finite = torch.isfinite(logits).all(dim=1)
    assert counted_samples(labels, 2, features, finite).tolist() == [True, False, False, False, False]


def test_label_reader_reads_on_the_device_and_checks_once() -> None:
    reader = LabelReader(lambda batch: batch["y"], 3, ignore_index=None)
    assert reader.read({"y": torch.tensor([1, 0])}, torch.device("cpu")).tolist() == [1, 0]
    with pytest.raises(ClassCountError, match="label 3 is out of range for 3 classes"):
        reader.check({"y": torch.tensor([3])})
    with pytest.raises(ClassCountError, match="set `ignore_index=-1`"):
        reader.check({"y": torch.tensor([-1])})
    with pytest.raises(BatchFormatError, match=r"shape \(batch,\)"):
        reader.check({"y": torch.zeros(2, 1, dtype=torch.long)})
    check_targets(torch.tensor([-100, 2]), 3, -100)  # ignored labels are not range-checked


def test_default_getters() -> None:
    assert default_label_getter({"targets": torch.tensor([1])}).tolist() == [1]
    with pytest.raises(BatchFormatError, match="`label_getter=`"):
        default_label_getter({"inputs": 1})
    tokens = {"input_ids": torch.ones(2, 4), "attention_mask": torch.ones(2, 4), "labels": torch.ones(2, 4)}
    assert sorted(default_input_getter(tokens)) == ["attention_mask", "input_ids"]
    assert default_input_getter({"pixel_values": 3}) == 3
    with pytest.raises(BatchFormatError, match="`input_getter=`"):
        default_input_getter({"y": 1})


def test_call_model_by_input_kind() -> None:
    def model(a: int, b: int = 10) -> int:
        return a * b

    assert call_model(model, 2) == 20
    assert call_model(model, (2, 3)) == 6
    assert call_model(model, [2, 4]) == 8
    assert call_model(model, {"b": 5, "a": 1}) == 5


def test_token_labels_are_shifted_and_masked() -> None:
    labels = torch.tensor([[3, 1, 4, 1], [5, 9, -100, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    batch = {"input_ids": labels.clamp(min=0), "labels": labels, "attention_mask": mask}
    shifted_reader = LabelReader(None, 10, -100, shift=True)
    assert shifted_reader.read(batch, torch.device("cpu"), (2, 4)).tolist() == [1, 4, 1, -1, 9, -1, -1, -1]
    aligned = LabelReader(None, 10, -100, shift=False)
    assert aligned.read(batch, torch.device("cpu"), (2, 4)).tolist() == [3, 1, 4, 1, 5, 9, -1, -1]
    no_mask = {"input_ids": labels, "labels": labels}
    assert shifted_reader.read(no_mask, torch.device("cpu"), (2, 4)).tolist() == [1, 4, 1, -1, 9, -1, 6, -1]
    with pytest.raises(BatchFormatError, match=r"token ids of shape \(2, 3\).*`label_getter=`.*`shift_labels=`"):
        aligned.read(batch, torch.device("cpu"), (2, 3))
    aligned.check(batch, (2, 4))
    bad = {"labels": torch.tensor([[3, 12, 4, 1]])}
    with pytest.raises(ClassCountError, match="label 12 is out of range for 10 classes"):
        aligned.check(bad, (1, 4))
    shifted_reader.check({"labels": torch.tensor([[12, 1, 2, 3]])}, (1, 4))  # 12 is no position's target
