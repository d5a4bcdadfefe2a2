"""Pure Neural Collapse math: tensors in, numbers out. Never imports Lightning.

The functions follow ``SPEC.md``; all arithmetic is float64 whatever the input dtype.
"""

from lightning_neural_collapse.functional.collapse import (
    ALL_KEYS,
    CLASSIFIER_KEYS,
    FEATURE_KEYS,
    NC4_KEY,
    centred_class_means,
    metrics_from_statistics,
    neural_collapse_metrics,
)
from lightning_neural_collapse.functional.etf_deviation import etf_deviation, ideal_values
from lightning_neural_collapse.functional.nc1 import nc1, nc1_cdnv
from lightning_neural_collapse.functional.nc2 import (
    equiangular,
    equinorm,
    etf_distance,
    max_angle,
    pairwise_cosines,
)
from lightning_neural_collapse.functional.nc3 import classwise_cosines, self_duality, self_duality_cosine
from lightning_neural_collapse.functional.nc4 import ncc_mismatch, ncc_predictions
from lightning_neural_collapse.functional.statistics import ClassStatistics, class_statistics, global_mean

__all__ = [
    "ALL_KEYS",
    "CLASSIFIER_KEYS",
    "FEATURE_KEYS",
    "NC4_KEY",
    "ClassStatistics",
    "centred_class_means",
    "class_statistics",
    "classwise_cosines",
    "equiangular",
    "equinorm",
    "etf_distance",
    "etf_deviation",
    "global_mean",
    "ideal_values",
    "max_angle",
    "metrics_from_statistics",
    "nc1",
    "nc1_cdnv",
    "ncc_mismatch",
    "ncc_predictions",
    "neural_collapse_metrics",
    "pairwise_cosines",
    "self_duality",
    "self_duality_cosine",
]
