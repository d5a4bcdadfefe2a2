"""The README's Python snippets run as written (in order, sharing one namespace)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_snippets_run(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    blocks = re.findall(r"```python\n(.*?)^ *```", README.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in blocks:
        exec(compile(textwrap.dedent(block), str(README), "exec"), namespace)
    nc = namespace["nc"]
    assert len(nc.history) == 5  # type: ignore[attr-defined]
    held = namespace["held"]  # the held-out example: one record per epoch's validation, every key defined
    assert len(held.val_history) == 5  # type: ignore[attr-defined]
    assert {"accuracy", "ncc_accuracy", "mean_shift", "nc1"} <= set(held.val_history[-1])  # type: ignore[attr-defined]
