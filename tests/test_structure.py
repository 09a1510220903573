"""The package's shape: imports run one way (no circles) and one module spells the variant
folder's file names."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "llama2_onnx"
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


def docstrings(tree: ast.AST) -> set[int]:
    """The ids of a module's, classes' and functions' docstring nodes."""
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree) if isinstance(node, owners)
            and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}


def variant_file_names() -> dict[str, re.Pattern]:
    """Each name of a variant folder's files, and how it shows inside a string."""
    from llama2_onnx import variant_folder as vf

    files = [vf.CONFIG, vf.MANIFEST, vf.TOKENIZER, vf.EMBEDDINGS, vf.ORIGINAL_EMBEDDINGS,
             vf.HF_TOKENIZER, vf.TOKENIZER_CONFIG, vf.GENERATION_CONFIG,
             vf.README, vf.GITATTRIBUTES, vf.GITIGNORE, vf.STAGING_MARK, f"*{vf.GRAPH_SUFFIX}"]
    names = {name: re.compile(re.escape(name)) for name in files}
    for folder in (vf.GRAPH_DIR, vf.CACHE_DIR):  # a path component ("ONNX Runtime" is not one)
        names[folder] = re.compile(rf"(^|/){re.escape(folder)}(/|$)")
    names[vf.GRAPH_SUFFIX] = re.compile(rf"{re.escape(vf.GRAPH_SUFFIX)}\b")
    return names


def spelled_file_names(tree: ast.AST) -> set[str]:
    """Variant file names in a module's string literals, the parts of f-strings (ast.JoinedStr)
    included, its docstrings aside."""
    skip = docstrings(tree)
    texts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and id(n) not in skip]
    return {name for name, pattern in variant_file_names().items()
            if any(pattern.search(text) for text in texts)}


def test_variant_file_names_are_spelled_in_one_module():
    """variant_folder.py spells every file name of a variant folder, in code and in the text it
    generates (messages, the README card, publish's exclusions): the others import its names."""
    from llama2_onnx import variant_folder as vf

    # Hugging Face checkpoints have a config.json and Meta's a tokenizer.model too: the modules
    # that read and write those formats spell them for the checkpoint folder. The distribution's
    # own README.md (its variant table) is publish's.
    allowed = {**{m: {vf.CONFIG, vf.TOKENIZER} for m in CHECKPOINT_MODULES},
               "publish": {vf.README}}
    for module in modules():
        if module == "variant_folder":
            continue
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        spelled = spelled_file_names(tree) - allowed.get(module, set())
        assert not spelled, f"{module}.py spells {spelled}; use llama2_onnx.variant_folder"
    sample = ast.parse('"""Reads config.json."""\nruntime = "ONNX Runtime"\n'
                       'msg = f"{folder}/ONNX/{name} has no manifest.json"')
    assert spelled_file_names(sample) == {"ONNX", "manifest.json"}  # the check can fail


STATE_WORDS = {"ready", "not pulled (Git LFS pointers)", "submodule not initialised",
               "incomplete", "absent", "empty", "legacy", "unknown"}
STATE_NAMES = {"READY", "NOT_PULLED", "NOT_INITIALISED", "INCOMPLETE", "ABSENT", "EMPTY",
               "LEGACY", "UNKNOWN", "NO_FOLDER"}


def state_constants(tree: ast.Module) -> set[str]:
    """Module-level constants that look like a folder state: a state's name, or a name bound to
    a state's word; and any name imported from variant_folder under another name."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names = [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            words = {n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant)}
            found |= {n for n in names if n in STATE_NAMES or (n.isupper() and words & STATE_WORDS)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("variant_folder"):
            found |= {f"{a.name} as {a.asname}" for a in node.names if a.asname}
    return found


def trees_except(owner: str):
    """(module, parsed tree) of every package module but `owner`."""
    for module in modules():
        if module != owner:
            yield module, ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))


def test_one_vocabulary_of_folder_states():
    """variant_folder.py alone names a folder's states; no module keeps a second vocabulary or
    imports the owner's under other names (the old `ABSENT as NO_FOLDER`)."""
    for module, tree in trees_except("variant_folder"):
        found = state_constants(tree)
        assert not found, f"{module}.py defines folder states {found}; use variant_folder's"
    sample = ast.parse('from .variant_folder import ABSENT as NO_FOLDER\nREADY, X = "ready", 1\n'
                       'GONE = "absent"')
    assert state_constants(sample) == {"ABSENT as NO_FOLDER", "READY", "X", "GONE"}


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
    for module, tree in trees_except("placement"):
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


def test_uvicorn_internals_are_used_by_one_module():
    users = [m for m in modules()
             if "uvicorn.protocols" in (PACKAGE / f"{m}.py").read_text(encoding="utf-8")]
    assert users == ["http_guard"], "only http_guard may reach below uvicorn's public API"
