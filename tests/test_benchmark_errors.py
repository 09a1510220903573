"""tools/benchmark.py follows the error contract: every mistake is one `error:` line and exit
code 2, before anything loads where it can be."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = [sys.executable, str(ROOT / "tools" / "benchmark.py")]


@pytest.mark.parametrize("args, words", [
    (["run", "--variant", "no_such_variant"], "neither a folder nor a slot"),
    (["run", "--variant", "demo", "--prompt-tokens", "0"], "--prompt-tokens 0 is invalid"),
    (["run", "--variant", "demo", "--reps", "0"], "--reps 0 is invalid"),
    (["run", "--variant", "demo", "--prompt-tokens", "5000"], "the context holds 512"),
    (["ttft", "--variant", "demo", "--lengths", "128,,x"], "--lengths '128,,x' is invalid"),
    (["compare", "--variants", ","], "--variants is empty"),
])
def test_benchmark_mistakes_are_one_sentence(args, words):
    run = subprocess.run(BENCH + args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_an_unknown_provider_is_argparses_choice_error():
    run = subprocess.run(BENCH + ["run", "--variant", "demo", "--provider", "tpu"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "argument --provider: invalid choice: 'tpu'" in run.stderr
