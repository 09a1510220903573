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
    from llama2_onnx import variant_folder as layout

    names = [layout.MANIFEST, layout.EMBEDDINGS, layout.ORIGINAL_EMBEDDINGS, layout.TOKENIZER,
             layout.CONFIG, layout.GRAPH_DIR]
    for module in modules():
        if module == "variant_folder":
            continue
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                    and isinstance(n.value, str)}
        allowed = {layout.CONFIG, layout.TOKENIZER} if module in CHECKPOINT_MODULES else set()
        spelled = (set(names) & literals) - allowed
        assert not spelled, f"{module}.py spells {spelled}; use llama2_onnx.variant_folder"


PROVIDER_NAMES = {"cuda", "dml", "cpu", "webgpu", "auto", "CUDAExecutionProvider",
                  "DmlExecutionProvider", "CPUExecutionProvider"}


def compared_provider_names(tree: ast.AST) -> set[str]:
    """Provider names that code compares something with (==, !=, in, a dict keyed by them)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elements = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) \
                    else [side]
                found |= {e.value for e in elements if isinstance(e, ast.Constant)}
        elif isinstance(node, ast.Dict):
            found |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
    return found & PROVIDER_NAMES


def test_only_the_placement_module_compares_provider_names():
    """Where and how a variant runs is decided once (placement.place); everything else reads
    the Placement it makes."""
    for module in modules():
        if module == "placement":
            continue
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        spelled = compared_provider_names(tree)
        assert not spelled, f"{module}.py decides by provider name {spelled}; use placement"
    sample = ast.parse('if provider == "dml" or device in ("cuda", "x"): pass')
    assert compared_provider_names(sample) == {"dml", "cuda"}  # the check can fail


def test_entry_points_build_prompts_only_through_the_prompt_builder():
    """The CLI, the chat app and the server feed the same tokens for the same conversation
    because one builder makes them (tests/test_prompt_agreement.py checks the tokens)."""
    users = {"chat_session": PACKAGE / "chat_session.py", "openai_api": PACKAGE / "openai_api.py",
             "cli": ROOT / "MinimumExample" / "Example_ONNX_LlamaV2.py"}
    for name, path in users.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").endswith("chat_format") for alias in node.names}
        assert "PromptBuilder" in imported, name
        assert imported <= {"PromptBuilder", "Exchange", "Message"}, (name, imported)
        encodes = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                   and n.attr == "encode" and "tokenizer" in ast.unparse(n.value)]
        assert not encodes, f"{name} encodes a prompt itself: {ast.unparse(encodes[0])}"


def test_the_webgpu_plugin_is_handled_in_one_module():
    """Registering the plugin, finding its device and selecting it live in webgpu.py."""
    spellings = ("onnxruntime_ep_webgpu", "register_execution_provider_library",
                 "get_ep_devices", "add_provider_for_devices", "enableGraphCapture")
    for module in modules():
        text = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
        found = [s for s in spellings if s in text]
        assert module == "webgpu" or not found, f"{module}.py spells {found}; use webgpu.py"
