"""``cifarlab audit``: label issues, duplicates and leaks, odd images (docs/audit.md)."""

from .label_issues import LabelIssues, find_label_issues

__all__ = ["LabelIssues", "find_label_issues"]
