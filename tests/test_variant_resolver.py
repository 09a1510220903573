"""One `--variant` resolver for every command: names, paths in every spelling, and one sentence
for each mistake."""

from __future__ import annotations

import pytest
from conftest import ROOT

from llama2_onnx.errors import VariantError
from llama2_onnx.variants import resolve_variant


@pytest.mark.parametrize("spelling", ["demo", "./demo", "demo/", "./demo/"])
def test_a_name_and_a_relative_path_find_the_same_folder(monkeypatch, spelling):
    monkeypatch.chdir(ROOT)
    assert resolve_variant(spelling, ROOT).resolve() == (ROOT / "demo").resolve()


def test_an_absolute_path_is_that_folder(tmp_path):
    assert resolve_variant(str(tmp_path), ROOT) == tmp_path


def test_a_missing_path_says_it_does_not_exist_not_that_the_name_is_bad(tmp_path):
    with pytest.raises(VariantError, match="no such folder") as caught:
        resolve_variant(str(tmp_path / "nonexistent" / "dir"), ROOT)
    assert "not allowed" not in str(caught.value)


def test_bad_names_and_unknown_slots_name_the_fix(tmp_path):
    with pytest.raises(VariantError, match="not allowed"):
        resolve_variant("-rf", tmp_path)
    with pytest.raises(VariantError, match="neither a folder nor a slot.*see --list"):
        resolve_variant("7B_FT_float99", tmp_path)
    with pytest.raises(VariantError, match="7B_FT_float16 is absent.*not published"):
        resolve_variant("7B_FT_float16", tmp_path)


def test_publish_and_verify_use_the_same_resolver():
    from llama2_onnx import commands

    assert commands.resolve_variant is resolve_variant
