"""Hyperparameter sweeps: W&B sweep files run on Optuna, offline, with pruning, resume and many workers.

:mod:`.spec` parses the W&B format, :mod:`.engine` runs the study, :mod:`.results` reads it back
(table, best config, narrowed second stage) and :mod:`.charts` draws the report.
"""

from .engine import SweepInterrupted, run_sweep  # noqa: F401
from .results import best_config_yaml, narrow, open_study, trial_rows  # noqa: F401
from .spec import base_config, load_sweep_file, parse_sweep  # noqa: F401
