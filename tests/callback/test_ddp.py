"""NeuralCollapseCallback under real multi-process DDP (2 CPU ranks, gloo): the same numbers as one process.

Each Lightning run is its own subprocess (``scripts/ddp_fit.py``): a ``strategy="ddp"`` launch re-executes
the command line, and a process group left behind in the pytest process breaks later tests. The script
writes one JSON per rank, a single-process reference computed on rank 0, and ``outcome.json``.
Five runs of about 15 s each on two cores; the fixtures share them between the tests.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_fit.py"
SAMPLES = 301  # odd: not a multiple of the world size
CLASSES = 4
VAL_SAMPLES = 200  # a multiple of the world size: Lightning's validation DistributedSampler pads otherwise
EXACT_KEYS = {"nc4_ncc_mismatch", "nc4_ncc_mismatch_prev_means", "train_error", "train_error_eval"}  # counts
# warnings that would mean trouble under DDP (Lightning's advice to sync, torchmetrics' empty-rank warning,
# our own "not measured"/"could not log" messages, a crash or a watchdog timeout)
BAD_OUTPUT = re.compile(
    r"sync_dist|It is recommended to use|was called before the ``update`` method|epoch \d+ (is )?not measured"
    r"|not fully reported|could not log|Traceback|Timeout \("
)

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(sys.platform == "win32", reason="gloo DDP tests run on Linux/macOS"),
]


class Run:
    """The outputs of one ``ddp_fit.py`` run."""

    def __init__(self, outdir: Path, proc: subprocess.CompletedProcess[str]) -> None:
        self.outdir = outdir
        self.output = proc.stdout + proc.stderr
        self.ranks = [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(2)]
        self.outcome = json.loads((outdir / "outcome.json").read_text())

    @property
    def rank0(self) -> dict[str, Any]:
        return self.ranks[0]

    def history(self, prefix: str = "nc", rank: int = 0) -> list[dict[str, float]]:
        return self.ranks[rank]["history"][prefix]


def launch(outdir: Path, *args: str) -> Run:
    # a launcher's variables in our environment would make the script join that job instead of starting one
    inherited = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env["OMP_NUM_THREADS"] = "1"
    data = ("--samples", str(SAMPLES), "--classes", str(CLASSES))
    cmd = [sys.executable, str(SCRIPT), str(outdir), *data, *args]
    proc = subprocess.run(cmd, timeout=240, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return Run(outdir, proc)


def assert_close(actual: float, expected: float, key: str, rtol: float = 1e-6) -> None:
    if key in EXACT_KEYS:
        assert actual == expected, (key, actual, expected)
    else:
        assert abs(actual - expected) <= rtol * max(abs(expected), 1e-9), (key, actual, expected)


def assert_matches(record: dict[str, float], reference: dict[str, float]) -> None:
    keys = set(reference) - {"samples"}
    assert keys <= set(record), keys - set(record)
    for key in keys:
        assert_close(record[key], reference[key], key)


def assert_clean(run: Run) -> None:
    bad = BAD_OUTPUT.search(run.output)
    assert bad is None, f"{bad.group(0)!r} in the output:\n{run.output[-6000:]}"


def assert_ranks_agree(run: Run) -> None:
    rank0, rank1 = run.ranks
    assert (rank0["rank"], rank1["rank"], rank0["world_size"], rank0["backend"]) == (0, 1, 2, "gloo")
    assert rank0["history"] == rank1["history"]
    assert rank0["tpt_epoch"] == rank1["tpt_epoch"]
    assert run.outcome["ranks_identical"]


def read_csv(run: Run) -> list[dict[str, str]]:
    with open(Path(run.rank0["log_dirs"][1]) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("exact")
    return launch(out, "--mode", "exact", "--epochs", "3", "--checkpoint-dir", str(out / "ckpt"))


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory, exact_run: Run) -> Run:
    out = tmp_path_factory.mktemp("resumed")
    ckpt = exact_run.outdir / "ckpt" / "epoch=1.ckpt"
    return launch(out, "--mode", "exact", "--epochs", "4", "--resume", str(ckpt), "--checkpoint-dir", str(out / "c"))


@pytest.fixture(scope="module")
def online_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("online")
    return launch(out, "--mode", "online", "--lr", "0", "--epochs", "3", "--val", str(VAL_SAMPLES + 1))


@pytest.fixture(scope="module")
def val_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("val")
    return launch(out, "--mode", "both", "--epochs", "3", "--val", str(VAL_SAMPLES), "--layers")


@pytest.fixture(scope="module")
def uneven_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("uneven")
    return launch(out, "--mode", "both", "--missing-class-on-rank1", "--uneven", "--epochs", "3")


# ----------------------------------------------------------------------------------------------- exact mode


def test_exact_mode_equals_single_process_reference(exact_run: Run) -> None:
    history = exact_run.history()
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert_matches(history[-1], exact_run.rank0["reference"])  # last epoch, measured on the final weights
    assert exact_run.outcome["ok"], exact_run.outcome
    assert_ranks_agree(exact_run)
    assert_clean(exact_run)


def test_exact_mode_counts_each_sample_once(exact_run: Run) -> None:
    # errors / 301 (a padded count would divide by 302): the exact pass shards without duplicates, while the
    # training steps (train_error) see the DistributedSampler's padding duplicate
    for record in exact_run.history():
        errors = record["train_error_eval"] * SAMPLES
        assert abs(errors - round(errors)) < 1e-9, record["train_error_eval"]
        step_errors = record["train_error"] * (SAMPLES + 1)
        assert abs(step_errors - round(step_errors)) < 1e-9, record["train_error"]
    assert exact_run.history()[0]["train_error_eval"] > 0
    # the unpadded shards (151 and 150 samples, batches of 30) give the ranks different numbers of batches
    assert [r["exact_pass_batches"] for r in exact_run.ranks] == [6, 5]
    for rank in exact_run.ranks:
        assert rank["sync_fn"] == "lightning_neural_collapse.metrics.base.all_reduce_sum"


def test_tpt_epoch_identical_on_both_ranks(exact_run: Run) -> None:
    tpt = [rank["tpt_epoch"]["nc"] for rank in exact_run.ranks]
    assert tpt[0] is not None and tpt[0] == tpt[1]
    history = exact_run.history()
    assert [r["epoch"] for r in history if "tpt_epoch" in r] == [tpt[0]]
    assert history[tpt[0]]["train_error"] == 0.0
    assert all(r["train_error"] > 0 for r in history[: tpt[0]])


def test_only_rank_zero_writes_files(exact_run: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figure0, figure1 = (rank["figure_path"]["nc"] for rank in exact_run.ranks)
    assert figure1 is None and figure0 is not None and Path(figure0).is_file()
    tb_dir = Path(exact_run.rank0["log_dirs"][0])
    assert len(list(tb_dir.glob("events.out.tfevents.*"))) == 1  # rank 1 opened no writer
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    history = exact_run.history()
    nc1 = acc.Scalars("nc/nc1")
    assert [e.step for e in nc1] == [r["step"] for r in history]
    assert [e.value for e in nc1] == pytest.approx([r["nc1"] for r in history], rel=1e-6)
    assert acc.Tags()["histograms"], "rank 0 writes the ETF-deviation histograms"
    rows = [row for row in read_csv(exact_run) if row.get("nc/train_error")]
    assert [float(row["nc/train_error"]) for row in rows] == [r["train_error"] for r in history]


def test_resume_under_ddp_continues_the_history(exact_run: Run, resumed_run: Run) -> None:
    before, after = exact_run.history(), resumed_run.history()
    assert [r["epoch"] for r in after] == [0, 1, 2, 3]
    assert after[:2] == before[:2]  # restored from the checkpoint of epoch 1
    for key, value in before[2].items():  # epoch 2 measured again, from the same state
        assert_close(after[2][key], value, key)
    assert resumed_run.rank0["steps_per_epoch"] == [6, 6]  # only epochs 2 and 3 ran
    assert resumed_run.rank0["tpt_epoch"] == exact_run.rank0["tpt_epoch"]
    assert_ranks_agree(resumed_run)
    assert_matches(after[-1], resumed_run.rank0["reference"])
    assert resumed_run.outcome["ok"], resumed_run.outcome
    assert_clean(resumed_run)


# ---------------------------------------------------------------------------------------------- online mode


def test_online_mode_logs_every_epoch_and_warns_once_about_padding(online_run: Run) -> None:
    assert_ranks_agree(online_run)
    history = online_run.history()
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert all("nc1" in r and "train_error" in r for r in history)
    lagged = "nc4_ncc_mismatch_prev_means"  # online NC4: against the previous epoch's means
    assert lagged not in history[0] and all(lagged in r and "nc4_ncc_mismatch" not in r for r in history[1:])
    logged = [row for row in read_csv(online_run) if row.get("nc/nc1")]
    assert len(logged) == 3
    assert online_run.output.count("the DistributedSampler pads 301 samples to a multiple of 2 ranks") == 1
    assert_clean(online_run)


def test_online_mode_with_fixed_weights_equals_what_the_ranks_fed(online_run: Run) -> None:
    references = online_run.rank0["seen_reference"]
    for record in online_run.history():
        reference = references[str(record["epoch"])]
        assert reference["samples"] == SAMPLES + 1  # the padding duplicate, counted as online mode sees it
        assert_matches(record, reference)
        errors = record["train_error"] * (SAMPLES + 1)
        assert abs(errors - round(errors)) < 1e-9
    assert online_run.outcome["ok"], online_run.outcome


# ---------------------------------------------------------------------- missing class, uneven shards/batches


def test_rank_without_a_class_and_uneven_batches(uneven_run: Run) -> None:
    rank0, rank1 = uneven_run.ranks
    last = CLASSES - 1
    assert last in rank0["train_classes_seen"] and last not in rank1["train_classes_seen"]
    assert last in rank0["exact_pass_classes"] and last not in rank1["exact_pass_classes"]
    # same number of steps (Lightning needs that), different samples and measured batches per rank;
    # rank 0 measured nothing in epoch 1
    assert rank0["steps_per_epoch"] == rank1["steps_per_epoch"]
    assert rank0["samples_fed_per_epoch"] == [201, 0, 201]
    assert rank1["samples_fed_per_epoch"][0] < 100 and rank1["samples_fed_per_epoch"][1] > 0
    assert_ranks_agree(uneven_run)
    assert uneven_run.outcome["ok"], uneven_run.outcome
    assert_clean(uneven_run)


def test_rank_without_a_class_exact_equals_reference(uneven_run: Run) -> None:
    history = uneven_run.history("nc")
    assert [r["epoch"] for r in history] == [0, 1, 2]
    for record in history:  # lr=0: every epoch is measured on the final weights
        assert_matches(record, uneven_run.rank0["reference"])


def test_rank_without_a_class_online_equals_union_of_fed_data(uneven_run: Run) -> None:
    history = uneven_run.history("nco")
    assert [r["epoch"] for r in history] == [0, 1, 2]
    references = uneven_run.rank0["seen_reference"]
    for record in history:
        assert_matches(record, references[str(record["epoch"])])
    assert references["1"]["samples"] == uneven_run.ranks[1]["samples_fed_per_epoch"][1]  # rank 1's data only
    assert not math.isnan(history[1]["nc1"])


# --------------------------------------------------------------------------------- failures on one rank


@pytest.fixture(scope="module")
def failures_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("failures")
    return launch(
        out,
        "--mode",
        "exact",
        "--epochs",
        "4",
        "--fail-labels-on-rank1",
        "1",
        "--fail-exact-on-rank1",
        "2",
        "--fail-tpt-hook-on-rank1",
        "--batch-norm",
        "--batch-size",
        "32",  # 151 samples per rank: no training batch of 1 sample, which BatchNorm refuses
    )


def test_a_failure_on_one_rank_leaves_no_rank_waiting(failures_run: Run) -> None:
    """Rank 1's label getter fails in epoch 1, its exact pass in epoch 2, its on_tpt_start once: no hang (each
    rank has a 200 s watchdog, the whole run 240 s), the same history on both ranks, training goes on."""
    assert_ranks_agree(failures_run)
    history = failures_run.history()
    assert [r["epoch"] for r in history] == [0, 2, 3]  # epoch 1: the training steps of a rank were not measured
    assert "nc1" in history[0] and "nc1" in history[2]
    assert "train_error" in history[1] and "nc1" not in history[1]  # epoch 2: the steps counted, the pass failed
    output = failures_run.output
    assert output.count("epoch 1 is not measured: 1 rank(s) could not take part (training steps)") == 1
    assert output.count("epoch 2 is not measured: 1 rank(s) could not take part (exact pass)") == 1
    assert "[rank: 1] NeuralCollapseCallback: epoch 1 not measured (training steps): KeyError: 'labels'" in output
    assert "[rank: 1] NeuralCollapseCallback: epoch 2 not measured (exact pass): RuntimeError" in output
    tpt = failures_run.rank0["tpt_epoch"]["nc"]
    assert tpt is not None and tpt == failures_run.ranks[1]["tpt_epoch"]["nc"]
    assert "[rank: 1] NeuralCollapseCallback: on_tpt_start raised RuntimeError" in output
    assert "Traceback" not in output and "Timeout (" not in output
    assert_matches(history[-1], failures_run.rank0["reference"])


def test_exact_mode_with_batch_norm_measures_rank_zeros_running_statistics(failures_run: Run) -> None:
    assert failures_run.output.count("every rank measures with rank 0's BatchNorm running statistics") == 1
    assert_matches(failures_run.history()[-1], failures_run.rank0["reference"])  # rank 0's model, one process


# ------------------------------------------------------------------------------------------------ validation


def test_held_out_keys_under_ddp_equal_one_process(val_run: Run) -> None:
    assert_ranks_agree(val_run)
    assert val_run.rank0["val_history"] == val_run.ranks[1]["val_history"]
    exact = val_run.rank0["val_history"]["nc"]
    assert [r["epoch"] for r in exact] == [0, 1, 2]  # the sanity check is not measured
    expected = val_run.rank0["val_reference"]
    assert set(expected) <= set(exact[-1])
    for key, value in expected.items():  # the last validation: the final model, the last exact pass's means
        if key in ("accuracy", "ncc_accuracy", "nc4_ncc_mismatch"):  # counts over all 200 samples, exactly
            assert round(exact[-1][key] * VAL_SAMPLES) == round(value * VAL_SAMPLES), key
            assert abs(exact[-1][key] * VAL_SAMPLES - round(exact[-1][key] * VAL_SAMPLES)) < 1e-9, key
        assert exact[-1][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    online = val_run.rank0["val_history"]["nco"]
    assert [r["epoch"] for r in online] == [0, 1, 2]
    assert all(0 <= r["ncc_accuracy"] <= 1 and math.isfinite(r["nc1"]) for r in online)
    assert [r["accuracy"] for r in online] == [r["accuracy"] for r in exact]  # the network's own: same model
    assert "validation DistributedSampler pads" not in val_run.output
    assert_clean(val_run)


def test_per_layer_keys_under_ddp_equal_one_process(val_run: Run) -> None:
    """Exact mode with ``layers=``: both passes' per-layer sums reduced over the ranks equal the float64 brute force
    of the whole training set on the final model; validation's per-layer NCC accuracy too."""
    assert_ranks_agree(val_run)
    expected = val_run.rank0["layer_reference"]
    last, val = val_run.history("nc")[-1], val_run.rank0["val_history"]["nc"][-1]
    for key, value in expected.items():
        got = val[key[4:]] if key.startswith("val:") else last[key]
        if key.endswith("ncc_accuracy"):  # counts
            assert got == value, key
        else:
            assert got == pytest.approx(value, rel=1e-6), key
    online = val_run.history("nco")[-1]
    assert all(math.isfinite(online[f"layers/{name}/nc1_prev_means"]) for name in ("body.1", "body.3"))
    assert online["layers/body.3/nc1_cdnv"] == pytest.approx(online["nc1_cdnv"], rel=1e-9)  # the classifier input


def test_a_padded_validation_sampler_is_warned_about_once(online_run: Run) -> None:
    assert online_run.output.count("the validation DistributedSampler pads 201 samples to a multiple of 2") == 1
    records = online_run.rank0["val_history"]["nc"]
    assert len(records) == 3 and online_run.ranks[1]["val_history"]["nc"] == records
    for record in records:  # 202 samples counted: 201 plus the padding duplicate
        assert abs(record["accuracy"] * 202 - round(record["accuracy"] * 202)) < 1e-9


# ------------------------------------------------------------------------------------------------ ddp_spawn


def test_ddp_spawn_smoke(tmp_path: Path) -> None:
    run = launch(tmp_path, "--mode", "exact", "--strategy", "ddp_spawn", "--epochs", "2")
    assert run.outcome["ok"], run.outcome
    assert_ranks_agree(run)
    assert_matches(run.history()[-1], run.rank0["reference"])
    assert_clean(run)
