"""Hyperparameter sweeps: W&B sweep files run on Optuna, offline, with pruning, resume and many workers.

:mod:`.spec` parses the W&B format; :mod:`.run` runs the study (``run_sweep``) with its
:mod:`.storage` (storage, trial states, sampler and pruner, the study's identity), :mod:`.workers`
(worker processes) and :mod:`.objective` (one trial); :mod:`.results` reads it back (table, best
config, narrowed second stage) and :mod:`.charts` draws the report.
"""

from .run import run_sweep  # noqa: F401
from .results import best_config_yaml, narrow, open_study, trial_rows  # noqa: F401
from .spec import base_config, load_sweep_file, parse_sweep  # noqa: F401
from .workers import SweepInterrupted  # noqa: F401
