"""Test-set evaluation of a run's best weights; logits saved once for every report."""

from .evaluate import evaluate_run, format_table, load_run_model  # noqa: F401
