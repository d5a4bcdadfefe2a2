"""The progressive-collapse figure: which epochs it draws, the layers' order, and He & Su's fit line."""

from __future__ import annotations

import math

from lightning_neural_collapse.reporting.depth_figure import chosen_records, layer_tags, plot_depth


def history(epochs: int = 12) -> list[dict[str, float]]:
    rows = []
    for epoch in range(epochs):
        row: dict[str, float] = {"epoch": epoch, "step": 10 * epoch}
        for depth, tag in enumerate(("stem", "layer1", "layer2@avgpool")):
            row[f"layers/{tag}/nc1_prev_means"] = math.exp(-0.5 * depth) / (1 + epoch)
            row[f"layers/{tag}/ncc_accuracy_prev_means"] = 0.5 + 0.1 * depth
            row[f"layers/{tag}/nc1_trace_ratio"] = 1.0 / (1 + depth + epoch)
        row["layers/nc1_depth_slope_prev_means"] = -0.5
        rows.append(row)
    return rows


def test_first_tpt_and_last_epochs_are_drawn_and_layers_keep_depth_order() -> None:
    rows = [{"epoch": 0, "train_error": 0.5}, *history()]  # a record without layer keys is not drawn
    picked = [int(row["epoch"]) for row in chosen_records(rows, tpt_epoch=9)]
    assert picked[0] == 0 and picked[-1] == 11 and 9 in picked and len(picked) == 4
    assert layer_tags(rows) == ["stem", "layer1", "layer2@avgpool"]


def test_the_nc1_panel_has_the_fit_line_with_ratio_and_r() -> None:
    figure = plot_depth(history(), tpt_epoch=3, title="t")
    assert figure is not None and len(figure.axes) == 8
    nc1 = figure.axes[0]
    labels = [line.get_label() for line in nc1.get_lines()]
    assert any(label.startswith("fit: ×0.607 per layer, r = -1.000") for label in labels), labels  # e^-0.5
    assert "epoch 3 (TPT)" in labels
    assert nc1.get_yscale() == "log" and figure.axes[3].get_yscale() == "linear"  # accuracy stays linear
    assert [t.get_text() for t in nc1.get_xticklabels()] == ["stem", "layer1", "layer2@avgpool"]
    assert figure.axes[2].texts[0].get_text() == "no data"  # no CDNV in these records


def test_no_layer_keys_no_figure() -> None:
    assert plot_depth([{"epoch": 0, "nc1": 1.0}]) is None
