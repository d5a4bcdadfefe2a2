"""The command line: ``lightning-neural-collapse report LOGDIR [LOGDIR ...] --out FILE``.

Also ``python -m lightning_neural_collapse report ...``. Exit status 0 on success, 2 for a usage error or a log
directory without Neural Collapse scalars (the message says which).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-neural-collapse", description="Tools for the logs of NeuralCollapseCallback runs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="compare runs: the paper's panels overlaid, TPT marked, and a table (HTML)",
        description=(
            "Read TensorBoard event files or CSVLogger metrics.csv files under each LOGDIR (every run found, one per "
            "callback prefix) and write the paper's panels with the runs overlaid: FILE.png a figure, FILE.html a "
            "self-contained page with the figure and a table of each run's TPT epoch and NC values at TPT and at "
            "the end."
        ),
    )
    report.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="a run's log directory, or a folder of runs")
    report.add_argument("--out", required=True, metavar="FILE", help="the report to write: .png or .html")
    report.add_argument("--title", default=None, help="the figure's title")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    from lightning_neural_collapse.reporting.report import write_report
    from lightning_neural_collapse.reporting.runs import ReportError, read_runs

    try:
        runs = [run for directory in args.logdirs for run in read_runs(directory)]
        path = write_report(runs, args.out, title=args.title)
    except ReportError as err:
        print(f"lightning-neural-collapse report: error: {err}", file=sys.stderr)
        return 2
    names = ", ".join(run.name for run in runs)
    print(f"wrote {path}: {len(runs)} run{'s' if len(runs) != 1 else ''} ({names})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
