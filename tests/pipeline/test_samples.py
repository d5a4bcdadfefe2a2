"""``pipeline.samples``: one row and one decision per sample, for classifiers and for sequence models."""

from __future__ import annotations

import pytest
import torch

from lightning_neural_collapse.pipeline.samples import CaptureShapeError, samples_from_weight, samples_of


def test_classifier_rows_and_singleton_dims() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [float("nan"), 0.0, 0.0]])
    got = samples_of(torch.ones(2, 4, 1, 1), logits[:, :, None, None])
    assert got.features.shape == (2, 4) and got.layout is None and got.num_classes == 3
    assert got.predictions[0] == 1 and got.finite.tolist() == [True, False]


def test_every_position_of_a_sequence_is_a_sample() -> None:
    features, logits = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    got = samples_of(features, logits)
    assert got.layout == (2, 3) and got.num_samples == 6
    assert torch.equal(got.features[4], features[1, 1]) and got.predictions[4] == logits[1, 1].argmax()


def test_scores_per_position_are_refused() -> None:
    with pytest.raises(CaptureShapeError, match=r"\(2, 3, 4, 4\).*1x1-conv head.*`classifier=`.*`features=`"):
        samples_of(torch.zeros(2, 5, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(CaptureShapeError, match="`features=`"):
        samples_of(torch.zeros(3, 5), torch.zeros(2, 3))


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_decisions_from_the_weight_match_the_logits(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    features, weight, bias = torch.randn(2, 4, 6, generator=g), torch.randn(7, 6, generator=g), torch.randn(7)
    features[1, 2, 0] = float("inf")  # a non-finite feature: non-finite logits for that position
    logits = features @ weight.T + bias
    got = samples_from_weight(features, weight, bias, chunk=chunk)
    expected = samples_of(features, logits)
    assert got.layout == (2, 4) and got.num_classes == 7
    assert torch.equal(got.finite, expected.finite) and not bool(got.finite[6])
    keep = expected.finite
    assert torch.equal(got.predictions[keep], expected.predictions[keep])
