"""The README tells the truth about commands that exist."""

from __future__ import annotations

import re

from conftest import ROOT

from llama2_onnx.slots import SLOTS

README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md")}


def test_readme_lists_every_slot_and_the_export_page_its_command():
    lines = ["| Slot | Command (from Meta's download; `<URL>`: where to push) |", "|---|---|"]
    lines += [f"| `{s.name}` | `{s.command}` |" for s in SLOTS]
    assert "\n".join(lines) in DOCS["export.md"]
    for slot in SLOTS:
        assert f"`{slot.name}`" in README


def test_readme_links_to_pages_that_exist():
    for page in re.findall(r"\(docs/([\w-]+\.md)", README):
        assert page in DOCS, page
    assert {"design.md", "benchmarks.md", "export.md", "serving.md"} <= set(DOCS)


def test_readme_test_command_is_what_ci_runs():
    assert "bash tools/test.sh" in README
    assert "exec bash tools/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_scripts_exist():
    for text in (README, *DOCS.values()):
        for path in set(re.findall(r"(?:tools|MinimumExample|ChatApp)/[\w/]+\.(?:py|sh)", text)):
            assert (ROOT / path).is_file(), path
