"""Reports: figures, metrics and one HTML page per run (:func:`make_report`), per comparison of runs
(:func:`compare_runs`) and per data set (:func:`data_overview`)."""

# compare
# dataset
from .metrics import classification_metrics, expected_calibration_error  # noqa: F401
from .single import make_report  # noqa: F401
