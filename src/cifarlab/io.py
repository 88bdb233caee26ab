"""Small file helpers shared across the package; imports nothing of cifarlab but its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CifarlabError


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, ``{}`` when the file does not exist; a damaged one is a one-line error."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CifarlabError(f"cannot read {path}: {e}") from None
