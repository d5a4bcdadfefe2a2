"""``reporting.runs`` / ``reporting.report`` / the ``report`` command: two short real runs, one logged to
TensorBoard and one to CSV, read back, compared, and the HTML parsed."""

from __future__ import annotations

import base64
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import toy
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from toy import ToyClassifier, ToyData

from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.cli import main
from lightning_neural_collapse.reporting.report import at_tpt_and_end, table_rows, write_report
from lightning_neural_collapse.reporting.runs import ReportError, read_runs

QUIET: dict[str, Any] = {key: v for key, v in toy.QUIET.items() if key != "logger"}
EPOCHS = 12


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[NeuralCollapseCallback]]:
    root = tmp_path_factory.mktemp("runs")
    callbacks = []
    for name, logger_type, lr in (("tb_run", TensorBoardLogger, 0.1), ("csv_run", CSVLogger, 0.05)):
        L.seed_everything(0)
        callback = NeuralCollapseCallback(mode="exact", log_figure=False)
        logger = logger_type(root / name, name="toy")
        trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[callback], logger=logger, **QUIET)
        trainer.fit(ToyClassifier(lr=lr, dropout=0.0), datamodule=ToyData())
        callbacks.append(callback)
    return root / "tb_run", root / "csv_run", callbacks


def test_runs_read_back_equal_the_callbacks_history(two_runs: Any) -> None:
    tb_dir, csv_dir, callbacks = two_runs
    for directory, callback in zip((tb_dir, csv_dir), callbacks, strict=True):
        (run,) = read_runs(str(directory))
        assert run.name == directory.name and run.prefix == "nc" and run.x_key == "epoch"
        assert run.tpt == callback.tpt_epoch
        assert [int(row["epoch"]) for row in run.history] == [int(r["epoch"]) for r in callback.history]
        for got, want in zip(run.history, callback.history, strict=True):
            for key in ("nc1", "nc2_equinorm_means", "nc3_self_duality", "train_error"):
                assert got[key] == pytest.approx(want[key], rel=1e-6), key  # float32 in TensorBoard's events


def test_html_report_compares_the_runs(two_runs: Any, tmp_path: Path) -> None:
    tb_dir, csv_dir, callbacks = two_runs
    out = tmp_path / "report.html"
    assert main(["report", str(tb_dir), str(csv_dir), "--out", str(out)]) == 0

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.images: list[str] = []
            self.rows: list[list[str]] = []
            self._cell: list[str] | None = None

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "img":
                self.images.append(dict(attrs)["src"] or "")
            elif tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self._cell = []

        def handle_endtag(self, tag: str) -> None:
            if tag in ("td", "th") and self._cell is not None:
                self.rows[-1].append("".join(self._cell).strip())
                self._cell = None

        def handle_data(self, data: str) -> None:
            if self._cell is not None:
                self._cell.append(data)

    page = Page()
    page.feed(out.read_text(encoding="utf-8"))
    (image,) = page.images
    assert image.startswith("data:image/png;base64,")  # self-contained
    assert base64.b64decode(image.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    header, *rows = page.rows
    assert header == ["run", "TPT epoch", "metric", "at TPT start", "at end", "end / TPT start"]
    assert {row[0] for row in rows} == {"tb_run", "csv_run"}
    for name, callback in zip(("tb_run", "csv_run"), callbacks, strict=True):
        nc1 = next(row for row in rows if row[0] == name and row[2] == "NC1")
        tpt = callback.tpt_epoch
        assert nc1[1] == ("none" if tpt is None else str(tpt))
        assert float(nc1[4]) == pytest.approx(callback.history[-1]["nc1"], rel=1e-3)
        if tpt is not None:
            start = next(r["nc1"] for r in callback.history if r["epoch"] >= tpt and "nc1" in r)
            assert float(nc1[3]) == pytest.approx(start, rel=1e-3)
            assert float(nc1[5]) == pytest.approx(callback.history[-1]["nc1"] / start, rel=2e-3)


def test_png_report_and_the_table(two_runs: Any, tmp_path: Path) -> None:
    tb_dir, csv_dir, _ = two_runs
    runs = read_runs(str(tb_dir)) + read_runs(str(csv_dir))
    out = write_report(runs, str(tmp_path / "sub" / "report.png"))
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table_rows(runs)
    assert len(rows) > 1 and all(len(row) == 6 for row in rows)
    start, end = at_tpt_and_end(runs[0], "nc1")
    assert end == pytest.approx(runs[0].history[-1]["nc1"])
    assert (start is None) == (runs[0].tpt is None)


def test_a_folder_of_runs_names_each(two_runs: Any) -> None:
    tb_dir, _, _ = two_runs
    root = tb_dir.parent
    runs = read_runs(str(root))
    assert [run.name for run in runs] == [f"{root.name}/csv_run/toy/version_0", f"{root.name}/tb_run/toy/version_0"]


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.csv").write_text("step,loss\n0,1.0\n")
    with pytest.raises(ReportError, match="no Neural Collapse scalars"):
        read_runs(str(empty))
    assert main(["report", str(empty), "--out", str(tmp_path / "r.html")]) == 2
    assert "no Neural Collapse scalars" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_python_dash_m_and_bad_suffix(two_runs: Any, tmp_path: Path) -> None:
    tb_dir, _, _ = two_runs
    command = [sys.executable, "-m", "lightning_neural_collapse", "report", str(tb_dir), "--out"]
    done = subprocess.run([*command, str(tmp_path / "r.pdf")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and ".png or .html" in done.stderr
    done = subprocess.run([*command, str(tmp_path / "r.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and (tmp_path / "r.png").exists(), done.stderr
