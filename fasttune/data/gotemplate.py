"""A small renderer for the subset of Go's text/template that Ollama chat templates use.

Supported: text and ``{{ ... }}`` actions (with ``{{-`` / ``-}}`` whitespace trimming); ``if`` / ``else if`` /
``else`` / ``end``; ``range $i, $m := PIPE`` (and ``range PIPE``); ``with PIPE``; variables ``$x := PIPE`` and
``$x = PIPE`` (assignment reaches the enclosing scope, as in Go); fields ``.A.B``, ``$.A``, ``$m.A``; literals
(strings, integers, true/false/nil); parentheses; and the functions eq, ne, lt, le, gt, ge, and, or, not, len, slice
(``slice x i`` is ``x[i:]``, ``slice x i j`` is ``x[i:j]``).
Truthiness follows Go: false, 0, nil, "" and empty collections are false. Anything else is a ``GoTemplateError``.

It exists so fasttune can check, without Ollama installed, that a Modelfile's TEMPLATE renders a conversation the way
the tokenizer's Jinja chat template does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\(|\)|,|:=|=|[^\s(),]+')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


class GoTemplateError(ValueError):
    """The template uses syntax outside the supported subset, or fails while rendering."""


@dataclass
class _Node:
    kind: str  # text | print | if | range | with | decl | assign
    text: str = ""
    expr: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    branches: list[tuple[list[str], list[_Node]]] = field(default_factory=list)
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with trim markers applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    pos = 0
    for match in _ACTION.finditer(template):
        text = template[pos:match.start()]
        if match[1]:
            text = text.rstrip()
        items.append(("text", text))
        items.append(("action", match[2].strip()))
        if match[3]:
            rest = template[match.end():]
            pos = match.end() + (len(rest) - len(rest.lstrip()))
        else:
            pos = match.end()
    items.append(("text", template[pos:]))
    return [(k, v) for k, v in items if not (k == "text" and v == "")]


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[_Node], int, str]:
    """Parse until an action starting with one of ``stop``; returns (nodes, index after it, that action)."""
    nodes: list[_Node] = []
    while i < len(items):
        kind, value = items[i]
        i += 1
        if kind == "text":
            nodes.append(_Node("text", text=value))
            continue
        head = value.split(None, 1)[0] if value else ""
        if head in stop or (value.startswith("else") and "else" in stop):
            return nodes, i, value
        if head == "if":
            node, i = _parse_if(items, i, value[2:].strip())
        elif head in ("range", "with"):
            node = _Node(head)
            expr = _tokens(value[len(head):])
            if head == "range" and ":=" in expr:
                at = expr.index(":=")
                node.names = [t for t in expr[:at] if t != ","]
                expr = expr[at + 1:]
            node.expr = expr
            node.body, i, end = _parse(items, i, ("end", "else"))
            if end.startswith("else"):
                node.orelse, i, _ = _parse(items, i, ("end",))
        elif head.startswith("$") and len(_tokens(value)) > 1 and _tokens(value)[1] in (":=", "="):
            toks = _tokens(value)
            node = _Node("decl" if toks[1] == ":=" else "assign", names=[toks[0]], expr=toks[2:])
        elif head in ("end", "else", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"unexpected or unsupported action {{{{ {value} }}}}")
        else:
            node = _Node("print", expr=_tokens(value))
        nodes.append(node)
    if stop:
        raise GoTemplateError(f"template ends before {{{{ {stop[0]} }}}}")
    return nodes, i, ""


def _parse_if(items: list[tuple[str, str]], i: int, cond: str) -> tuple[_Node, int]:
    node = _Node("if")
    while True:
        body, i, end = _parse(items, i, ("end", "else"))
        node.branches.append((_tokens(cond), body))
        if end == "end":
            return node, i
        rest = end[4:].strip()
        if rest.startswith("if "):
            cond = rest[3:]
            continue
        node.orelse, i, _ = _parse(items, i, ("end",))
        return node, i


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def truthy(value: Any) -> bool:
    return not (value is None or value is False or value == 0 and not isinstance(value, str) or value == ""
                or (hasattr(value, "__len__") and not isinstance(value, str) and len(value) == 0))


class _Renderer:
    def __init__(self, data: Any):
        self.root = data
        self.scopes: list[dict[str, Any]] = [{"$": data}]

    def lookup(self, name: str) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for scope in reversed(self.scopes):
            if name in scope:
                scope[name] = value
                return
        raise GoTemplateError(f"assignment to undeclared variable {name}")

    def operand(self, tok: str, dot: Any) -> Any:
        if tok.startswith('"'):
            return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[1]), tok[1:-1])
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if tok in ("true", "false", "nil"):
            return {"true": True, "false": False, "nil": None}[tok]
        if tok == ".":
            return dot
        base, _, path = tok.partition(".") if tok.startswith("$") else ("", "", tok[1:])
        value = self.lookup(base) if base else dot
        for part in filter(None, path.split(".")):
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        return value

    def eval(self, toks: list[str], dot: Any) -> Any:
        args, i = [], 0
        while i < len(toks):
            if toks[i] == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(toks[j], 0)
                    j += 1
                args.append(("value", self.eval(toks[i + 1:j - 1], dot)))
                i = j
            else:
                args.append(("tok", toks[i]))
                i += 1
        if not args:
            raise GoTemplateError("empty pipeline")
        kind, head = args[0]
        if kind == "tok" and head in _FUNCS:
            values = [v if k == "value" else self.operand(v, dot) for k, v in args[1:]]
            return _FUNCS[head](*values)
        if len(args) != 1:
            raise GoTemplateError(f"cannot evaluate {' '.join(toks)!r} (unsupported function {head!r}?)")
        return head if kind == "value" else self.operand(head, dot)

    def render(self, nodes: list[_Node], dot: Any, out: list[str]) -> None:
        self.scopes.append({})
        try:
            for node in nodes:
                self.render_node(node, dot, out)
        finally:
            self.scopes.pop()

    def render_node(self, node: _Node, dot: Any, out: list[str]) -> None:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "print":
            value = self.eval(node.expr, dot)
            out.append("" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
        elif node.kind == "decl":
            self.scopes[-1][node.names[0]] = self.eval(node.expr, dot)
        elif node.kind == "assign":
            self.assign(node.names[0], self.eval(node.expr, dot))
        elif node.kind == "if":
            for cond, body in node.branches:
                if truthy(self.eval(cond, dot)):
                    self.render(body, dot, out)
                    return
            self.render(node.orelse, dot, out)
        elif node.kind == "with":
            value = self.eval(node.expr, dot)
            self.render(node.body if truthy(value) else node.orelse, value if truthy(value) else dot, out)
        elif node.kind == "range":
            self.render_range(node, dot, out)

    def render_range(self, node: _Node, dot: Any, out: list[str]) -> None:
        items = list(self.eval(node.expr, dot) or [])
        if not items:
            self.render(node.orelse, dot, out)
        for index, item in enumerate(items):
            scope = {}
            if len(node.names) == 2:
                scope = {node.names[0]: index, node.names[1]: item}
            elif len(node.names) == 1:
                scope = {node.names[0]: item}
            self.scopes.append(scope)
            try:
                self.render(node.body, item, out)
            finally:
                self.scopes.pop()


def _and(*args: Any) -> Any:
    for a in args:
        if not truthy(a):
            return a
    return args[-1]


def _or(*args: Any) -> Any:
    for a in args:
        if truthy(a):
            return a
    return args[-1]


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "and": _and, "or": _or,
    "not": lambda a: not truthy(a), "len": lambda a: len(a), "slice": lambda a, i=0, j=None: a[i:j],
}


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """Render ``template`` with ``data`` as the root (``.`` and ``$``)."""
    nodes, _, _ = _parse(_lex(template), 0, ())
    out: list[str] = []
    _Renderer(data).render(nodes, data, out)
    return "".join(out)
