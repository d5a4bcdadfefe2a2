"""NC4's nearest-class-centre rule: chunked over classes, absent classes never chosen, ties to the lowest label."""

from __future__ import annotations

import torch

from lightning_neural_collapse.functional import ncc_predictions
from lightning_neural_collapse.functional.nc4 import NearestClassCentre


def test_chunks_give_the_brute_force_argmin() -> None:
    g = torch.Generator().manual_seed(0)
    means = 50 + torch.randn(37, 6, generator=g).double()
    present = torch.rand(37, generator=g) > 0.2
    features = 50 + torch.randn(200, 6, generator=g).double()
    distances = torch.cdist(features, means).masked_fill(~present[None, :], float("inf"))
    expected = distances.argmin(dim=1)
    for chunk in (1, 5, 36, 37, 1000):
        assert torch.equal(NearestClassCentre(means, present, chunk_size=chunk).predict(features), expected), chunk
    assert not present[expected].logical_not().any()


def test_ties_go_to_the_smallest_label_across_chunks() -> None:
    means = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    features = torch.tensor([[0.9], [-0.9]])
    for chunk in (1, 2, 4):
        assert NearestClassCentre(means, chunk_size=chunk).predict(features).tolist() == [0, 1]


def test_non_finite_rows_are_absent() -> None:
    means = torch.tensor([[0.0], [float("nan")], [10.0]])
    assert ncc_predictions(torch.tensor([[4.0], [6.0]]), means).tolist() == [0, 2]
