"""The expression grammar shared by `graph`, `losses`, `objectives`, `init` and `prior`.

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary)*
    unary   := '-' unary | postfix
    postfix := atom ('.' NAME '(' args ')')*        # x.detach(), dis.features(x)
    atom    := NUMBER | NAME | call | '(' expr ')' | '[' items ']'
    call    := NAME ['.' NAME] '(' args ')'
    args    := [arg (',' arg)*] ; arg := expr | NAME '=' expr

Parsed into small immutable nodes and interpreted by the compiler: never Python's eval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ExprError(ValueError):
    def __init__(self, message: str, column: int | None = None):
        super().__init__(message + (f" (at character {column + 1})" if column is not None else ""))


@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Name:
    id: str


@dataclass(frozen=True)
class Call:
    func: str  # an op, a network (`dec`), or a network's tap (`dis.features`)
    args: tuple
    kwargs: tuple = ()  # ((name, node), ...)


@dataclass(frozen=True)
class BinOp:
    op: str
    left: object
    right: object


@dataclass(frozen=True)
class Neg:
    operand: object


@dataclass(frozen=True)
class ListExpr:
    items: tuple


_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[-+*/(),=\[\].]))"
)
_MAX_LENGTH = 2000
_MAX_NODES = 200


def tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExprError(f"unexpected character {text[pos:].lstrip()[:1]!r}", len(text) - len(text[pos:].lstrip()))
        kind = m.lastgroup
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    tokens.append(("end", "", len(text)))
    return tokens


def parse(text) -> object:
    """Parse an expression; numbers given as YAML numbers are accepted as they are."""
    if isinstance(text, bool):
        raise ExprError("expected an expression, not true/false")
    if isinstance(text, (int, float)):
        return Num(float(text))
    if not isinstance(text, str):
        raise ExprError(f"expected an expression (a string), not {type(text).__name__}")
    if len(text) > _MAX_LENGTH:
        raise ExprError(f"expression longer than {_MAX_LENGTH} characters")
    if not text.strip():
        raise ExprError("empty expression")
    parser = _Parser(tokenize(text))
    node = parser.expr()
    parser.expect("end")
    return node


class _Parser:
    def __init__(self, tokens):
        self.tokens = tokens
        self.i = 0
        self.depth = 0
        self.count = 0

    def peek(self):
        return self.tokens[self.i]

    def take(self):
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, kind: str, value: str | None = None):
        tok = self.take()
        if tok[0] != kind or (value is not None and tok[1] != value):
            wanted = repr(value) if value else ("the end" if kind == "end" else f"a {kind}")
            got = "the end" if tok[0] == "end" else repr(tok[1])
            raise ExprError(f"expected {wanted}, found {got}", tok[2])
        return tok

    def at(self, value: str) -> bool:
        return self.peek()[0] == "op" and self.peek()[1] == value

    def expr(self):
        self.depth += 1
        if self.depth > 100:
            raise ExprError("expression nested too deeply")
        node = self.term()
        while self.at("+") or self.at("-"):
            op = self.take()[1]
            node = self.node(BinOp(op, node, self.term()))
        self.depth -= 1
        return node

    def term(self):
        node = self.unary()
        while self.at("*") or self.at("/"):
            op = self.take()[1]
            node = self.node(BinOp(op, node, self.unary()))
        return node

    def unary(self):
        negate = False
        while self.at("-") or self.at("+"):  # a loop, not recursion: '- - - x' has no depth limit
            negate ^= self.take()[1] == "-"
        operand = self.postfix()
        if not negate:
            return operand
        return Num(-operand.value) if isinstance(operand, Num) else self.node(Neg(operand))

    def node(self, node):
        """Count nodes: every later stage walks the tree recursively, so its size is bounded."""
        self.count += 1
        if self.count > _MAX_NODES:
            raise ExprError(f"expression has more than {_MAX_NODES} operations; split it into named losses")
        return node

    def postfix(self):
        node = self.atom()
        while self.at("."):
            self.take()
            name = self.expect("name")[1]
            args, kwargs = self.arguments()
            if isinstance(node, Name) and name != "detach":
                node = self.node(Call(f"{node.id}.{name}", args, kwargs))  # a network's named tap
            else:
                node = self.node(Call(name, (node, *args), kwargs))  # method form of an op: x.detach()
        return node

    def atom(self):
        kind, value, col = self.peek()
        if kind == "num":
            self.take()
            return Num(float(value))
        if kind == "name":
            self.take()
            if self.at("("):
                args, kwargs = self.arguments()
                return Call(value, args, kwargs)
            return Name(value)
        if self.at("("):
            self.take()
            node = self.expr()
            self.expect("op", ")")
            return node
        if self.at("["):
            self.take()
            items = []
            if not self.at("]"):
                items.append(self.expr())
                while self.at(","):
                    self.take()
                    items.append(self.expr())
            self.expect("op", "]")
            return ListExpr(tuple(items))
        raise ExprError("expected a name, a number or '('" + ("" if kind != "end" else ", found the end"), col)

    def arguments(self):
        self.expect("op", "(")
        args, kwargs = [], []
        if not self.at(")"):
            while True:
                kind, value, col = self.peek()
                if kind == "name" and self.tokens[self.i + 1][1] == "=" and self.tokens[self.i + 1][0] == "op":
                    self.take()
                    self.take()
                    if value in dict(kwargs):
                        raise ExprError(f"argument {value!r} given twice", col)
                    kwargs.append((value, self.expr()))
                else:
                    if kwargs:
                        raise ExprError("positional argument after a keyword argument", col)
                    args.append(self.expr())
                if not self.at(","):
                    break
                self.take()
        self.expect("op", ")")
        return tuple(args), tuple(kwargs)


def names(node) -> set[str]:
    """Every bare name and called function name in an expression."""
    out: set[str] = set()
    _walk(node, out, calls=True)
    return out


def free_names(node) -> set[str]:
    """Bare names only (not the names of called ops or networks)."""
    out: set[str] = set()
    _walk(node, out, calls=False)
    return out


def _walk(node, out: set, calls: bool) -> None:
    if isinstance(node, Name):
        out.add(node.id)
    elif isinstance(node, Call):
        if calls:
            out.add(node.func)
        for a in node.args:
            _walk(a, out, calls)
        for _, a in node.kwargs:
            _walk(a, out, calls)
    elif isinstance(node, BinOp):
        _walk(node.left, out, calls)
        _walk(node.right, out, calls)
    elif isinstance(node, Neg):
        _walk(node.operand, out, calls)
    elif isinstance(node, ListExpr):
        for a in node.items:
            _walk(a, out, calls)


def to_text(node) -> str:
    """An expression back as canonical text (used by show and diff)."""
    if isinstance(node, Num):
        return number_text(node.value)
    if isinstance(node, Name):
        return node.id
    if isinstance(node, Call):
        parts = [to_text(a) for a in node.args] + [f"{k}={to_text(v)}" for k, v in node.kwargs]
        return f"{node.func}({', '.join(parts)})"
    if isinstance(node, Neg):
        inner = to_text(node.operand)
        # -(-x) must not print as --x, which reads back as x
        return f"-({inner})" if isinstance(node.operand, (Neg, BinOp)) or inner.startswith("-") else f"-{inner}"
    if isinstance(node, ListExpr):
        return "[" + ", ".join(to_text(a) for a in node.items) + "]"
    prec = 1 if node.op in "+-" else 2
    right_prec = prec + (1 if node.op in "-/" else 0)
    return f"{_wrap(node.left, prec)} {node.op} {_wrap(node.right, right_prec)}"


def number_text(value: float) -> str:
    """Shortest exact text of a number (repr), without a trailing .0 on whole numbers."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _wrap(node, prec: int) -> str:
    text = to_text(node)
    own = 1 if isinstance(node, BinOp) and node.op in "+-" else 2 if isinstance(node, BinOp) else 3
    return f"({text})" if own < prec else text


def constant(node, params: dict) -> object:
    """Evaluate a constant expression of numbers, params and lists (optimiser and init args)."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Name):
        if node.id in params and isinstance(params[node.id], (int, float)) and not isinstance(params[node.id], bool):
            return float(params[node.id])
        if node.id in ("true", "false"):
            return node.id == "true"
        raise ExprError(f"{node.id!r} is not a number or a param")
    if isinstance(node, Neg):
        return -_number(constant(node.operand, params))
    if isinstance(node, ListExpr):
        return [constant(a, params) for a in node.items]
    if isinstance(node, BinOp):
        a, b = _number(constant(node.left, params)), _number(constant(node.right, params))
        if node.op == "/" and b == 0:
            raise ExprError("division by zero")
        return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0.0}[node.op]
    raise ExprError("expected a number, a param or a list of them here")


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExprError("expected a number")
    return float(value)
