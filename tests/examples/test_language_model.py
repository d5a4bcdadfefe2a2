"""The language-model example (`make demo-lm`), shortened: a BPE trained here, windows logged, the LM metrics."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("language_model_demo", EXAMPLES / "language_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_shortened_language_model_demo(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        summary = _load().main(
            [
                "--epochs",
                "2",
                "--max-chars",
                "60000",
                "--vocab",
                "300",
                "--window",
                "5",
                "--no-progress-bar",
                "--logdir",
                str(tmp_path),
                "--threads",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    log_dir = Path(summary["log_dir"])
    assert json.loads((log_dir / "summary.json").read_text())["windows"] == summary["windows"] >= 4
    last = summary["rows"]["last window"]
    for key in ("nc1_cdnv", "nc2_log_energy_means", "nc3_cosine_cov", "nc4_ncc_mismatch_prev_means"):
        assert key in last, key
    assert summary["cdnv_ratio"] is not None and summary["figure_path"] is not None
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("nc/nc1_cdnv")]
    assert steps == sorted(steps) and steps[0] == 4 and len(steps) == summary["windows"]
    assert "nc/nc4_ncc_mismatch_prev_means" in acc.Tags()["scalars"]
