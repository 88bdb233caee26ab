"""The study pipeline: a study file (:mod:`.spec`) run as one resumable command (:mod:`.pipeline`)."""

from .pipeline import run_study  # noqa: F401
from .spec import load_study_file  # noqa: F401
