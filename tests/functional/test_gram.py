"""``functional.gram``: the upper-triangle Gram against the full product, for every panel count and dtype mix."""

from __future__ import annotations

import pytest
import torch

from lightning_neural_collapse.functional.gram import add_upper_gram_, gram_panels, symmetric_from_upper


@pytest.mark.parametrize("dim", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("panels", [None, 1, 2, 3, 8, 300])
def test_upper_gram_equals_the_full_product(dim: int, panels: int | None) -> None:
    g = torch.Generator().manual_seed(dim)
    h = torch.randn(50, dim, generator=g, dtype=torch.float64)
    out = add_upper_gram_(torch.zeros(dim, dim, dtype=torch.float64), h, panels=panels)
    assert torch.allclose(symmetric_from_upper(out), h.T @ h, rtol=1e-13, atol=1e-12)
    again = add_upper_gram_(out, h, panels=panels)  # it accumulates
    assert torch.allclose(symmetric_from_upper(again), 2 * (h.T @ h), rtol=1e-13, atol=1e-12)


def test_float32_products_into_float64_sums() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 96, generator=g)
    out = torch.zeros(96, 96, dtype=torch.float64)
    for part in h.split(100):
        add_upper_gram_(out, part)
    expected = h.double().T @ h.double()
    assert out.dtype == torch.float64
    assert torch.allclose(symmetric_from_upper(out), expected, rtol=1e-5, atol=1e-4)  # float32 products


def test_the_lower_triangle_is_never_read() -> None:
    upper = torch.triu(torch.arange(16.0).view(4, 4))
    garbage = upper + torch.tril(torch.full((4, 4), 1e9), diagonal=-1)
    assert torch.equal(symmetric_from_upper(garbage), symmetric_from_upper(upper))
    assert torch.equal(symmetric_from_upper(upper), symmetric_from_upper(upper).T)


def test_panels_and_shape_errors() -> None:
    assert [gram_panels(d) for d in (1, 63, 64, 128, 4096)] == [1, 1, 2, 4, 8]
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        add_upper_gram_(torch.zeros(2, 2), torch.zeros(4, 3))
