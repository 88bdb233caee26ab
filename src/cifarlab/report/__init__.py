"""Reports: figures, metrics and one HTML page per run (:func:`make_report`), per comparison of runs
(:func:`compare_runs`) and per data set (:func:`data_overview`)."""

from .compare import compare_runs  # noqa: F401
from .dataset import data_overview  # noqa: F401
from .single import make_report  # noqa: F401
