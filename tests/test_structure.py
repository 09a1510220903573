"""The package's shape: imports run one way (no circles) and one module spells the variant
folder's file names."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "llama2_onnx"
# Hugging Face checkpoints have a config.json too: the modules that read and write that format
# spell it for the checkpoint folder, not for a variant folder.
CHECKPOINT_MODULES = {"checkpoints", "synthetic"}


def imports_of(module: str) -> set[str]:
    """Package modules that `module` imports, at the top or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama2_onnx."):
            found.add(node.module.split(".")[1])
    return found - {module}


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_import_graph_has_no_circles():
    graph = {m: imports_of(m) & set(modules()) for m in modules()}
    assert sum(len(v) for v in graph.values()) > 40  # the walk sees the package's imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_variant_file_names_are_spelled_in_one_module():
    from llama2_onnx import layout

    names = [layout.MANIFEST, layout.EMBEDDINGS, layout.LEGACY_EMBEDDINGS, layout.TOKENIZER,
             layout.CONFIG, layout.GRAPH_DIR]
    for module in modules():
        if module == "layout":
            continue
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                    and isinstance(n.value, str)}
        allowed = {layout.CONFIG, layout.TOKENIZER} if module in CHECKPOINT_MODULES else set()
        spelled = (set(names) & literals) - allowed
        assert not spelled, f"{module}.py spells {spelled}; use llama2_onnx.layout"


def test_uvicorn_internals_are_used_by_one_module():
    users = [m for m in modules()
             if "uvicorn.protocols" in (PACKAGE / f"{m}.py").read_text(encoding="utf-8")]
    assert users == ["http_guard"], "only http_guard may reach below uvicorn's public API"
