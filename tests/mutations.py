"""Plant known bugs in a copy of the repository and report which tests catch each one.

    python tests/mutations.py                       # every mutation, whole suite each
    python tests/mutations.py --only rotary_sin_sign --tests tests/test_oracle_meta.py
    python tests/mutations.py --list

Each mutation is a set of exact text replacements (each must match exactly once, so a mutation
that no longer applies fails loudly instead of testing nothing). For each one the tracked and
untracked (not ignored) files are copied to a temporary folder, committed there as a repository
of its own, the replacements applied, and pytest run in the copy; the repository itself is never
touched. A mutation that no test catches is a hole in the suite.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    edits: tuple[tuple[str, str, str], ...]  # (file, exact old text, new text)


MUTATIONS = [
    Mutation("rotary_sin_sign", "rotary tables with the sign of sin flipped (rope.py)", (
        ("llama2_onnx/rope.py", "return np.cos(angles), np.sin(angles)",
         "return np.cos(angles), -np.sin(angles)"),)),
    Mutation("meta_permutation_inverted",
             "Meta q/k permutation inverted in the reader and in the synthetic Meta writer", (
        ("llama2_onnx/checkpoints.py", "split = w.reshape(n_heads, rows // n_heads // 2, 2, cols)",
         "split = w.reshape(n_heads, 2, rows // n_heads // 2, cols)"),
        ("llama2_onnx/synthetic.py", "split = w.reshape(n_heads, 2, rows // n_heads // 2, cols)",
         "split = w.reshape(n_heads, rows // n_heads // 2, 2, cols)"))),
    Mutation("chat_prefill_late", "a new chat turn's pre-fill written one position late", (
        ("llama2_onnx/generation.py", "logits = self.runner.run(self.embeddings[tokens[a:b]], a)",
         "logits = self.runner.run(self.embeddings[tokens[a:b]], a + (keep > 0))"),)),
    Mutation("decode_kv_late", "decode writes the KV cache one position late", (
        ("llama2_onnx/session.py", 'self.step["seqlens_k"][0] = start',
         'self.step["seqlens_k"][0] = start + 1'),
        ("llama2_onnx/session.py", "else start + 1\n", "else start + 2\n"))),
    Mutation("meta_wk_not_permuted", "Meta wk rows not permuted by the reader", (
        ("llama2_onnx/checkpoints.py",
         '        elif name.endswith("attention.wk.weight"):\n'
         "            arr = meta_to_half_split(arr, self.config.n_kv_heads)\n", ""),)),
    Mutation("republish_keeps_old_pin", "republishing keeps the submodule's old pin", (
        ("llama2_onnx/publish.py", "    if old:\n        _git_out(\"update-index\", \"--force",
         '    pinned = _git_out("ls-files", "-s", "--", path, cwd=dist, env=env)'
         '.startswith("160000")\n'
         "    if old and not pinned:\n        _git_out(\"update-index\", \"--force"),
        ("llama2_onnx/publish.py",
         '    _git_out("update-index", "--add", "--cacheinfo", f"160000,',
         "    if not pinned:\n"
         '        _git_out("update-index", "--add", "--cacheinfo", f"160000,'))),
    Mutation("top_p_off_by_one", "top-p keeps one token more than the nucleus", (
        ("llama2_onnx/sampling.py",
         'return int(np.searchsorted(cumulative, target, side="left")) + 1',
         'return int(np.searchsorted(cumulative, target, side="left")) + 2'),)),
    Mutation("temperature_ignored", "sampling ignores the temperature", (
        ("llama2_onnx/sampling.py",
         "np.exp((scores - scores.max()) / np.float32(settings.temperature))",
         "np.exp(scores - scores.max())"),)),
    Mutation("chat_missing_space", "chat format loses the space after each answer", (
        ("llama2_onnx/chat_format.py", '{E_INST} {answer.strip()} "', '{E_INST} {answer.strip()}"'),
    )),
    Mutation("chat_missing_eos", "chat format loses the EOS after each answer", (
        ("llama2_onnx/chat_format.py", "return tokenizer.encode(text, bos=True, eos=True)",
         "return tokenizer.encode(text, bos=True, eos=False)"),)),
    Mutation("weight_untransposed", "the attention output weight wo left untransposed", (
        ("llama2_onnx/graph.py", 'self.writer.add(name + "_t", array.T.astype(self.dtype))',
         'self.writer.add(name + "_t", (array if name.endswith("wo.weight") else array.T)'
         '.astype(self.dtype))'),)),
    Mutation("llama3_unsmoothed", "llama3 rope scaling divides the middle band by the factor "
             "instead of interpolating it (rope.py)", (
        ("llama2_onnx/rope.py", "between = (1 - smooth) * inv_freq / factor + smooth * inv_freq",
         "between = inv_freq / factor"),)),
    Mutation("rope_scaling_not_in_the_graph", "the graph's rotary tables ignore rope scaling", (
        ("llama2_onnx/graph.py", "c.max_seq_len, c.rope_scaling)", "c.max_seq_len)"),)),
    Mutation("tied_output_zero", "a tied model's output projection read as zeros", (
        ("llama2_onnx/checkpoints.py",
         "        return self._check(name, safetensors_io.read_tensor(self.infos[name]))",
         "        array = safetensors_io.read_tensor(self.infos[name])\n"
         "        if self.tied and name == \"output.weight\":\n"
         "            array = array * 0\n"
         "        return self._check(name, array)"),)),
    Mutation("manifest_size_only", "the manifest check compares sizes only, never sha256", (
        ("llama2_onnx/files.py", 'elif sha256 and sha256_file(path) != entry["sha256"]:',
         'elif False and sha256_file(path) != entry["sha256"]:'),)),
]


def copy_repository(dest: Path) -> None:
    """Copy the work tree as git sees it (tracked and untracked, not ignored) to `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = ROOT / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    # A repository of its own, unmutated, for the tests that clone the checkout they run in.
    identity = ["-c", "user.name=mutations", "-c", "user.email=mutations@localhost"]
    for command in (["init", "-q"], ["add", "-A"], [*identity, "commit", "-q", "-m", "copy"]):
        subprocess.run(["git", *command], cwd=dest, capture_output=True, check=True)


def apply(mutation: Mutation, repo: Path) -> None:
    for rel, old, new in mutation.edits:
        path = repo / rel
        text = path.read_text(encoding="utf-8")
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"{mutation.name}: {old!r} occurs {count} times in {rel}; update "
                             "the mutation to the current code.")
        path.write_text(text.replace(old, new), encoding="utf-8")


def run_tests(repo: Path, tests: list[str], timeout: int) -> tuple[list[str], str]:
    """Run pytest in `repo`; returns the failing/erroring test ids and pytest's last line."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p",
                               "no:cacheprovider", *tests], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ["(timed out)"], f"timed out after {timeout} s"
    lines = proc.stdout.splitlines()
    failed = sorted({m.group(2) for line in lines
                     if (m := re.match(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", line))})
    return failed, (lines[-1] if lines else proc.stderr.strip()[-300:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutation names (default: all)")
    parser.add_argument("--tests", nargs="*", default=["tests"], help="pytest arguments")
    parser.add_argument("--baseline", action="store_true", help="first run the unmutated copy")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list or not (chosen or args.baseline):
        for m in MUTATIONS:
            print(f"{m.name:28} {m.what}")
        return
    runs = ([Mutation("baseline", "no mutation", ())] if args.baseline else []) + chosen
    for mutation in runs:
        with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
            repo = Path(tmp)
            copy_repository(repo)
            apply(mutation, repo)
            start = time.monotonic()
            failed, summary = run_tests(repo, args.tests, args.timeout)
        print(f"## {mutation.name}: {mutation.what}\n{summary} ({time.monotonic() - start:.0f} s)"
              f"; {len(failed)} failing:", flush=True)
        for test in failed:
            print(f"  {test}", flush=True)


if __name__ == "__main__":
    main()
