"""Send Neural Collapse numbers to Lightning loggers: scalars, histograms, a dashboard and figures.

Everything here takes plain numbers and tensors, dispatches on what each logger can do (duck typing, so
``pytorch_lightning`` loggers work too), runs on global rank 0 only, and never raises out of a logging
call: a failure becomes one ``RuntimeWarning`` per (logger type, kind) and the run goes on.
"""

from lightning_neural_collapse.reporting.capabilities import can_log_figure, figure_kind, histogram_kind, run_dir
from lightning_neural_collapse.reporting.dashboard import dashboard_layout, log_dashboard
from lightning_neural_collapse.reporting.figures import log_figure, plot_history, save_figure
from lightning_neural_collapse.reporting.histograms import log_histograms, occupied
from lightning_neural_collapse.reporting.scalars import log_scalars

__all__ = [
    "occupied",
    "can_log_figure",
    "dashboard_layout",
    "figure_kind",
    "histogram_kind",
    "log_dashboard",
    "log_figure",
    "log_histograms",
    "log_scalars",
    "plot_history",
    "run_dir",
    "save_figure",
]
