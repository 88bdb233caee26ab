"""Test-set evaluation of a run's best weights; logits saved once for every report."""

from .evaluate import evaluate_run, format_table  # noqa: F401
from .loader import LoadedModel, load_model  # noqa: F401
