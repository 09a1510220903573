"""The README tells the truth about commands that exist."""

from __future__ import annotations

import re

from conftest import ROOT

from llama2_onnx.slots import SLOTS

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_lists_every_slot_with_its_command():
    lines = ["| Slot | Command (from Meta's download; `<URL>`: where to push) |", "|---|---|"]
    lines += [f"| `{s.name}` | `{s.command}` |" for s in SLOTS]
    assert "\n".join(lines) in README
    for slot in SLOTS:
        assert f"`{slot.name}`" in README


def test_readme_test_command_is_what_ci_runs():
    assert "bash tools/test.sh" in README
    assert "exec bash tools/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_scripts_exist():
    for path in set(re.findall(r"(?:tools|MinimumExample|ChatApp)/[\w/]+\.(?:py|sh)", README)):
        assert (ROOT / path).is_file(), path
