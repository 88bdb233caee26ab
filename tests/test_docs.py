"""Docs that match the code (issue 20): every ``cifarlab ...`` command in README.md and docs/*.md parses with the
real argument parser, and every ``section.key`` they name is a key of the run config."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

from cifarlab.cli.main import build_parser
from cifarlab.config import RENAMED_KEYS, SECTIONS
from cifarlab.models import list_models, model_defaults

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # RUN_DIR, N, DIR: stand for a value
FILE_SUFFIXES = {"py", "json", "html", "yaml", "yml", "csv", "png", "npz", "pt", "onnx", "safetensors", "md", "sh",
                 "db", "txt", "gz", "tar", "log"}


def _commands(text: str) -> list[tuple[str, bool]]:
    """(command after ``cifarlab``, from a code block) for every cifarlab command line of a Markdown text."""
    found: list[tuple[str, bool]] = []
    blocks = FENCE.findall(text)
    outside = FENCE.sub("", text)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            found += [(c, True) for c in _split(line)]
    for span in INLINE.findall(outside):
        found += [(c, False) for c in _split(span)]
    return found


def _split(line: str) -> list[str]:
    line = re.split(r"\s#\s|^#", line)[0]  # a comment
    out = []
    for part in re.split(r"&&|\|\||[|;>]", line):
        # cifarlab as the command: first on the line (after VAR=value settings), or after -m (python, torchrun)
        m = re.search(r"(?:^\s*(?:\w+=\S*\s+)*|\s-m\s+)cifarlab\s+(\S.*)$", part)
        if m:
            out.append(m.group(1).strip())
    return out


def _argv(command: str) -> list[str]:
    tokens = [t.strip("[]") for t in shlex.split(command)]
    tokens = [t for t in tokens if t and t != "..." and not t.endswith("...")]
    return ["1" if PLACEHOLDER.match(t) else t for t in tokens]


def _parse_error(argv: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if e.code else None
    return None


def _all_commands() -> list[tuple[str, str, bool]]:
    return [(doc.name, c, block) for doc in DOCS for c, block in _commands(doc.read_text())]


def test_the_docs_hold_commands():
    cmds = _all_commands()
    assert len(cmds) > 40 and {doc for doc, _, _ in cmds} >= {"README.md", "sweeps.md", "reports.md"}


@pytest.mark.parametrize("doc, command, block", _all_commands())
def test_every_documented_command_parses(doc, command, block):
    argv = _argv(command)
    error = _parse_error(argv)
    if error and not block and ("the following arguments are required" in error and len(argv) <= 2
                                or "expected one argument" in error and argv[-1].startswith("-")):
        return  # prose naming a verb or a flag ("`cifarlab evaluate` writes them"), not a command line
    assert error is None, f"{doc}: cifarlab {command}\n  -> {error}"


def _config_keys() -> set[str]:
    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls) if f.name != "params"}
    return keys | {f"model.{k}" for m in list_models() for k in model_defaults(m)}


def test_every_documented_config_key_exists():
    keys, bad = _config_keys() | set(RENAMED_KEYS), []  # an old name may be named as such
    for doc in DOCS:
        # Error messages quoted in the docs name wrong keys on purpose; Python examples have their own names.
        text = re.sub(r"^```python\n.*?^```", "", doc.read_text(), flags=re.S | re.M)
        text = "\n".join(line for line in text.splitlines() if "cifarlab: error:" not in line)
        for m in re.finditer(r"(?<![\w./-])(data|model|optim|train)\.([a-z_][a-z0-9_]*)\b(?![.(/\w-])", text):
            key = f"{m.group(1)}.{m.group(2)}"
            if m.group(2) not in FILE_SUFFIXES and key not in keys:
                bad.append(f"{doc.name}: {key}")
    assert not bad, "documented keys that the config does not have:\n" + "\n".join(sorted(set(bad)))


def test_the_checks_catch_a_wrong_command_and_key():
    assert _parse_error(_argv("train --config c.yaml --no-such-flag")) is not None
    assert _parse_error(_argv("data --epochs 3")) is not None
    assert _split("cifarlab sweep best S > best.yaml && cifarlab train --config best.yaml") == \
        ["sweep best S", "train --config best.yaml"]
    assert "data.flip" in _config_keys() and "data.hflip" not in _config_keys()


def test_ci_runs_the_readme_test_command_with_every_slow_test():
    """.ci/run runs exactly the README's test command (its second command line), and that runs the whole suite:
    the default tests, then every slow one (``-m slow`` on no file list)."""
    readme_lines = FENCE.findall((REPO / "README.md").read_text())[0].strip().splitlines()
    test_command = readme_lines[1]
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln and not ln.lstrip().startswith("#")]
    assert test_command in ci, f".ci/run does not run the README's test command:\n{test_command}"
    steps = [s.strip() for s in test_command.split("&&")]
    assert steps[-2:] == ["python -m pytest -q", "python -m pytest -q -m slow"], steps
