"""``fasttune port``: apply the port rule to an Unsloth notebook (.ipynb) or script (.py), writing a new file.

The rule, and nothing else: imports from ``unsloth`` (and its submodules, e.g. ``unsloth.chat_templates``) come from
``fasttune``; imports from ``trl`` come from ``fasttune.trl``; RL notebooks' ``from vllm import SamplingParams`` (and
``from vllm.lora.request import LoRARequest``) come from fasttune, which samples without vLLM. Only import statements are rewritten, found with ``ast``
(comments, strings and other code are never touched); in a notebook only code cells change, IPython lines (``%``,
``!``) are left as they are, and the JSON is written back in the notebook's own layout. ``import unsloth`` becomes
``import fasttune as unsloth`` when the code uses the name ``unsloth`` later (so ``unsloth.X`` keeps working).

    fasttune port notebook.ipynb                 # writes notebook_fasttune.ipynb, prints each change
    fasttune port train.py -o train_ft.py --force
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

# module prefix of the old import -> module of the new one
RULE: dict[str, str] = {"unsloth": "fasttune", "trl": "fasttune.trl"}
# vLLM module -> (fasttune module, the names it provides): RL notebooks import these from vLLM, which fasttune does
# not use; a `from vllm ... import` of only these names is rewritten, any other vLLM import is left alone.
VLLM: dict[str, tuple[str, frozenset[str]]] = {
    "vllm": ("fasttune", frozenset({"SamplingParams"})),
    "vllm.lora.request": ("fasttune.rl", frozenset({"LoRARequest"})),
}


@dataclass(frozen=True)
class Change:
    """One rewritten statement: where (cell index or None for a script, 1-based line in it), old and new text."""

    cell: int | None
    line: int
    old: str
    new: str

    def __str__(self) -> str:
        where = f"cell {self.cell}, line {self.line}" if self.cell is not None else f"line {self.line}"
        return f"{where}: {self.old.strip()}  ->  {self.new.strip()}"


def new_module(name: str) -> str | None:
    """``unsloth[.x]`` -> ``fasttune[.x]``; ``trl`` -> ``fasttune.trl``; anything else (incl. ``trl.x``) -> None."""
    if name == "unsloth" or name.startswith("unsloth."):
        return RULE["unsloth"] + name[len("unsloth"):]
    if name == "trl":
        return RULE["trl"]
    return None


def _from_target(node: ast.ImportFrom) -> str | None:
    """The module a ``from X import ...`` statement should import from under the rule, or None."""
    if node.level:
        return None
    module = node.module or ""
    if module in VLLM:
        target, names = VLLM[module]
        return target if all(alias.name in names for alias in node.names) else None
    return new_module(module)


_MAGIC = re.compile(r"^\s*[%!]")


def _parseable(source: str) -> str:
    """The source with IPython lines (``%magic``, ``!shell``) blanked, so ``ast`` can parse a notebook cell."""
    return "".join("\n" if _MAGIC.match(line) else line for line in source.splitlines(keepends=True))


def _import_text(node: ast.Import, used_names: set[str]) -> str | None:
    parts, changed = [], False
    for alias in node.names:
        target = new_module(alias.name)
        if target is None:
            parts.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
            continue
        changed = True
        if alias.asname:
            parts.append(f"{target} as {alias.asname}")
        elif "." not in alias.name and alias.name in used_names:
            parts.append(f"{target} as {alias.name}")  # `unsloth.X` / `trl.X` later in the code keep working
        else:
            parts.append(target)
    return "import " + ", ".join(parts) if changed else None


def _chars(line: str, byte_offset: int) -> int:
    """ast's column offsets count UTF-8 bytes; the character offset in ``line``."""
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8"))


_FROM = re.compile(r"(from\s+)([\w.]+)")


def port_source(source: str, cell: int | None = None) -> tuple[str, list[Change]]:
    """``source`` (Python, or a notebook cell with IPython lines) with the port rule applied, and the changes."""
    tree = ast.parse(_parseable(source))
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    lines = source.splitlines(keepends=True)
    edits: list[tuple[ast.stmt, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _from_target(node):
            edits.append((node, "from"))
        elif isinstance(node, ast.Import) and any(new_module(a.name) for a in node.names):
            edits.append((node, "import"))
    changes = []
    for node, kind in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        first, last = node.lineno - 1, node.end_lineno - 1
        text = "".join(lines[first:last + 1])
        start = _chars(lines[first], node.col_offset)
        end = len(text) - len(lines[last]) + _chars(lines[last], node.end_col_offset)
        if kind == "from":
            target = _from_target(node)
            stmt = _FROM.sub(lambda m, target=target: m.group(1) + target, text[start:end], count=1)
        else:
            stmt = _import_text(node, used)
        new_text = text[:start] + stmt + text[end:]
        changes.append(Change(cell, node.lineno, text[start:end], stmt))
        lines[first:last + 1] = [new_text]
    return "".join(lines), sorted(changes, key=lambda c: c.line)


def _notebook_layout(text: str, notebook: dict) -> dict | None:
    """The json.dumps options that reproduce ``text`` exactly (Jupyter writes indent=1, no ASCII escaping)."""
    indent = len(text.split("\n", 2)[1]) - len(text.split("\n", 2)[1].lstrip(" ")) if "\n" in text else None
    for ensure_ascii in (False, True):
        options = {"indent": indent, "ensure_ascii": ensure_ascii}
        dumped = json.dumps(notebook, **options)
        if dumped in (text, text.rstrip("\n")):
            return {**options, "newline": text.endswith("\n")}
    return None


def port_notebook(text: str) -> tuple[str, list[Change], list[str]]:
    """A notebook's JSON text with the rule applied to its code cells -> (text, changes, notes)."""
    notebook = json.loads(text)
    layout = _notebook_layout(text, notebook)
    changes: list[Change] = []
    notes = [] if layout else ["the notebook's JSON layout was not recognised; it is written with Jupyter's (indent=1)"]
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        joined = "".join(source) if isinstance(source, list) else source
        try:
            new, cell_changes = port_source(joined, cell=index)
        except SyntaxError as error:
            notes.append(f"cell {index} is not valid Python ({error.msg}, line {error.lineno}); left as it is")
            continue
        if cell_changes:
            cell["source"] = new.splitlines(keepends=True) if isinstance(source, list) else new
            changes += cell_changes
    options = layout or {"indent": 1, "ensure_ascii": False, "newline": True}
    out = json.dumps(notebook, indent=options["indent"], ensure_ascii=options["ensure_ascii"])
    return out + ("\n" if options["newline"] else ""), changes, notes


def default_output(path: Path) -> Path:
    return path.with_name(f"{path.stem}_fasttune{path.suffix}")


def port_file(path: Path, output: Path | None = None, force: bool = False) -> tuple[Path, list[Change], list[str]]:
    """Port ``path`` (.ipynb or .py) into ``output`` -> (output, changes, notes). Never writes over ``path``."""
    if path.suffix not in (".ipynb", ".py"):
        raise ValueError(f"path: {str(path)!r} is not a .ipynb notebook or .py script")
    output = output or default_output(path)
    if output.resolve() == path.resolve():
        raise ValueError(f"output: {str(output)!r} is the input file; fasttune port never overwrites its input")
    if output.exists() and not force:
        raise FileExistsError(f"output: {str(output)!r} exists; pass --force to replace it, or -o another path")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        new, changes, notes = port_notebook(text)
    else:
        new, changes = port_source(text)
        notes = []
    if any("pip install" in line and "unsloth" in line for line in text.splitlines()):
        notes.append("pip install lines that name unsloth are left as they are; install fasttune instead")
    output.write_text(new, encoding="utf-8")
    return output, changes, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttune port", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="an Unsloth notebook (.ipynb) or script (.py)")
    parser.add_argument("-o", "--output", type=Path, help="where to write (default: PATH_fasttune.ipynb/.py)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists (never the input)")
    args = parser.parse_args(argv)
    try:
        output, changes, notes = port_file(args.path, args.output, args.force)
    except (ValueError, FileExistsError, FileNotFoundError, SyntaxError) as error:
        print(f"fasttune port: {error}")
        return 1
    for change in changes:
        print(change)
    for note in notes:
        print(f"note: {note}")
    print(f"{len(changes)} import{'s' if len(changes) != 1 else ''} changed; wrote {output}")
    return 0
