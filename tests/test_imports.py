"""What importing the package costs: the functional API needs only torch, the metrics no Lightning."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("lightning", "lightning.pytorch", "lightning.fabric", "matplotlib", "torchmetrics", "tensorboard")


def loaded_after(statement: str) -> list[str]:
    """The heavy modules in ``sys.modules`` after ``statement`` in a fresh interpreter."""
    code = f"import sys\n{statement}\nimport json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_functional_api_needs_only_torch() -> None:
    assert loaded_after("import lightning_neural_collapse.functional as F; F.neural_collapse_metrics") == []
    assert loaded_after("import lightning_neural_collapse") == []


def test_the_metrics_load_no_lightning() -> None:
    loaded = loaded_after("from lightning_neural_collapse import NeuralCollapse, NCCMismatch")
    assert "torchmetrics" in loaded and not {"lightning", "lightning.pytorch", "lightning.fabric"} & set(loaded)


def test_the_callback_is_imported_when_first_named() -> None:
    loaded = loaded_after("from lightning_neural_collapse import NeuralCollapseCallback")
    assert "lightning.pytorch" in loaded
    import lightning_neural_collapse

    assert "NeuralCollapseCallback" in dir(lightning_neural_collapse)
    try:
        lightning_neural_collapse.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as err:
        assert "NoSuchThing" in str(err)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
