"""The package's import graph has no cycle, counting every import statement (lazy ones inside functions too).

A cycle hidden behind a function-level import still ties two modules together: each can only be understood, moved or
tested with the other. ARCHITECTURE.md draws the intended direction (kernels <- patch <- train, export -> lora/models).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fasttune
from fasttune.models import families, vision_families

ROOT = Path(fasttune.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """fasttune modules that ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # the top-level facade imports everything and nothing imports it back except through it
    assert graph["fasttune.loader"], "the graph builder found no imports at all"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# -- a family's facts live in fasttune/models/ only ------------------------------------------------------------------
MODELS = ROOT / "models"

# String literals equal to a registered family name or model_type that may appear outside fasttune/models/, each with
# the reason it is not a family fact written twice: another namespace that happens to share the word, or a choice.
ALLOWED: dict[tuple[str, str], str] = {
    **{("data/formats/table.py", name): "an Unsloth chat template name (get_chat_template), not a model family"
       for name in ("mistral", "gemma", "gemma2", "gemma3", "phi3")},
    **{("data/formats/reasoning.py", name): "an Unsloth chat template name (get_chat_template), not a model family"
       for name in ("qwen3", "gpt_oss")},
    ("export/gguf/mixes.py", "llama"): "llama.cpp's architecture name in its quantizer's rules (TensorMap.arch)",
    ("export/gguf/tokenizer.py", "llama"): "GGUF's tokenizer model name (SentencePiece), not the Llama family",
    ("export/gguf/tokenizer.py", "qwen2"): "llama.cpp's pre-tokenizer name, not the Qwen2 family",
    ("quickstart/__init__.py", "llama"): "the quickstart's choice of tiny architecture (quickstart.FAMILY)",
    ("quickstart/vision.py", "qwen2_vl"): "the vision quickstart's choice of tiny architecture",
    ("tiny/tokenizer.py", "llama"): "build_tokenizer's default family (a choice, not a fact of the family)",
}


def _family_names() -> set[str]:
    """Every name the registry knows a family by: family names and model types, text and vision-language."""
    return ({s.family for s in families()} | {s.model_type for s in families()}
            | {v.family for v in vision_families()} | {v.model_type for v in vision_families()})


def _family_literals(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, literal) of each string constant in ``source`` equal to one of ``names``; docstrings are prose."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                  and id(node) not in docstrings)


def test_family_names_and_tables_live_only_in_models():
    """A family's name or model_type written as a literal outside fasttune/models/ is a per-family fact (or a table of
    them, such as a dict keyed by model_type) kept out of the registry: generic code must ask the registry instead.
    Adding a family must stay one file in fasttune/models/ plus one registry line."""
    names = _family_names()
    found: set[tuple[str, str]] = set()
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        if MODELS in path.parents:
            continue
        relative = path.relative_to(ROOT).as_posix()
        for line, value in _family_literals(path.read_text(), names):
            found.add((relative, value))
            if (relative, value) not in ALLOWED:
                problems.append(f"fasttune/{relative}:{line}: {value!r}")
    assert not problems, ("family names outside fasttune/models/ (put the fact in the family's file and ask the "
                          "registry):\n" + "\n".join(problems))
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"ALLOWED entries no longer needed (remove them): {stale}"


def test_the_family_literal_finder_finds_a_table():
    source = '"""qwen2_vl in a docstring is prose."""\nPACKABLE = {"qwen2_vl": "mrope", "llava": "1d", "other": 1}\n'
    assert _family_literals(source, {"qwen2_vl", "llava"}) == [(2, "llava"), (2, "qwen2_vl")]
