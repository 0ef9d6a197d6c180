"""A small interpreter for the subset of Go's text/template that fasttune's Ollama templates use (test helper).

Supported: literal text; ``{{ expr }}``; ``if``/``else if``/``else``/``end``; ``range $i, $m := expr``; ``with``;
``$x := expr`` and ``$x = expr`` (Go scoping: a block opens a scope, ``=`` assigns the nearest definition); the
functions ``eq ne lt gt and or not len slice``; fields of maps (a missing field is nil, printed as ``<no value>`` as Go
does for maps). Trim markers (``{{-``) are rejected: fasttune's templates do not use them.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|\$[A-Za-z_]*(?:\.[A-Za-z_]+)*|(?:\.[A-Za-z_]+)+|\.|[A-Za-z_]+)')


def _tokens(expr: str) -> list[str]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if not match or match.end() == pos:
            raise SyntaxError(f"cannot parse {expr[pos:]!r}")
        out.append(match.group(1))
        pos = match.end()
    return [t for t in out if t]


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict)) and not value)


class Template:
    def __init__(self, source: str):
        parts, pos = [], 0
        for match in _ACTION.finditer(source):
            parts.append(("text", source[pos:match.start()]))
            action = match.group(1)
            if action.startswith("-") or action.endswith("-"):
                raise SyntaxError("trim markers are not supported")
            parts.append(("action", action.strip()))
            pos = match.end()
        parts.append(("text", source[pos:]))
        self.tree, rest = self._parse(parts, 0)
        if rest != len(parts):
            raise SyntaxError("unexpected {{ end }}")

    def _parse(self, parts, i, stop=("end",)):
        nodes = []
        while i < len(parts):
            kind, body = parts[i]
            if kind == "text":
                nodes.append(("text", body))
                i += 1
                continue
            head = body.split(" ", 1)[0]
            if head in ("end", "else"):
                return nodes, i
            if head in ("if", "with", "range"):
                node, i = self._parse_block(parts, i, head, body[len(head):].strip())
                nodes.append(node)
                continue
            nodes.append(("action", body))
            i += 1
        return nodes, i

    def _parse_block(self, parts, i, head, arg):
        branches, i = [], i + 1
        body, i = self._parse(parts, i)
        branches.append((arg, body))
        while parts[i][1].startswith("else"):
            rest = parts[i][1][4:].strip()
            cond = rest[3:].strip() if rest.startswith("if ") else None
            body, i = self._parse(parts, i + 1)
            branches.append((cond, body))
        return (head, branches), i + 1

    def render(self, data: dict) -> str:
        out: list[str] = []
        self._run(self.tree, [{"$": data}], data, out)
        return "".join(out)

    def _run(self, nodes, scopes, dot, out):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "action":
                self._action(node[1], scopes, dot, out)
            elif kind in ("if", "with"):
                for cond, body in node[1]:
                    value = True if cond is None else self._eval(_tokens(cond), scopes, dot)
                    if _truth(value):
                        self._run(body, scopes + [{}], value if kind == "with" and cond is not None else dot, out)
                        break
            elif kind == "range":
                (decl, body), *others = node[1]
                names, expr = decl.split(":=")
                key_name, value_name = [n.strip() for n in names.split(",")]
                items = self._eval(_tokens(expr), scopes, dot) or []
                for index, item in enumerate(items):
                    self._run(body, scopes + [{key_name: index, value_name: item}], item, out)
                if not items and others:
                    self._run(others[0][1], scopes + [{}], dot, out)

    def _action(self, body, scopes, dot, out):
        match = re.match(r"(\$\w+)\s*(:?=)\s*(.*)", body, re.DOTALL)
        if match:
            name, op, expr = match.groups()
            value = self._eval(_tokens(expr), scopes, dot)
            if op == ":=":
                scopes[-1][name] = value
                return
            for scope in reversed(scopes):
                if name in scope:
                    scope[name] = value
                    return
            raise NameError(f"undefined variable {name}")
        value = self._eval(_tokens(body), scopes, dot)
        out.append("<no value>" if value is None else str(value).lower() if isinstance(value, bool) else str(value))

    def _eval(self, tokens, scopes, dot):
        value, rest = self._command(tokens, scopes, dot)
        if rest:
            raise SyntaxError(f"trailing tokens {rest}")
        return value

    def _command(self, tokens, scopes, dot):
        funcs = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
                 "gt": lambda a, b: a > b, "not": lambda a: not _truth(a), "len": len,
                 "slice": lambda a, i=0, j=None: a[i:j],
                 "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
                 "or": lambda *a: next((x for x in a if _truth(x)), a[-1])}
        if tokens and tokens[0] in funcs:
            args, rest = [], tokens[1:]
            while rest and rest[0] != ")":
                arg, rest = self._operand(rest, scopes, dot)
                args.append(arg)
            return funcs[tokens[0]](*args), rest
        return self._operand(tokens, scopes, dot)

    def _operand(self, tokens, scopes, dot):
        token, rest = tokens[0], tokens[1:]
        if token == "(":
            value, rest = self._command(rest, scopes, dot)
            return value, rest[1:]
        if token.startswith('"'):
            return token[1:-1].encode().decode("unicode_escape"), rest
        if re.fullmatch(r"-?\d+", token):
            return int(token), rest
        if token.startswith("$"):
            name, *fields = token.split(".")
            if name == "$" and not fields[:1] == [""]:
                value = scopes[0]["$"]
            else:
                value = next((s[name] for s in reversed(scopes) if name in s), None)
            for field in fields:
                value = value.get(field) if isinstance(value, dict) else None
            return value, rest
        if token.startswith("."):
            value = dot
            for field in token.split(".")[1:]:
                if field:
                    value = value.get(field) if isinstance(value, dict) else None
            return value, rest
        raise SyntaxError(f"unknown token {token!r}")
