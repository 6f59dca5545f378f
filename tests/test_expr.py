"""The expression grammar of graph / losses / objectives / init / prior, and its interpreter for constants."""

from __future__ import annotations

import pytest

from genspec.lang import expr as E
from genspec.lang.expr import BinOp, Call, ExprError, ListExpr, Name, Neg, Num


def N(x):
    return Name(x)


# ---------------------------------------------------------------- parsing

PARSES = [
    ("x", N("x")),
    ("2", Num(2.0)),
    ("1e-3", Num(0.001)),
    ("1.5E+2", Num(150.0)),
    (".5", Num(0.5)),
    ("a + b * c", BinOp("+", N("a"), BinOp("*", N("b"), N("c")))),
    ("a * b + c", BinOp("+", BinOp("*", N("a"), N("b")), N("c"))),
    ("(a + b) * c", BinOp("*", BinOp("+", N("a"), N("b")), N("c"))),
    ("a - b - c", BinOp("-", BinOp("-", N("a"), N("b")), N("c"))),
    ("a / b / c", BinOp("/", BinOp("/", N("a"), N("b")), N("c"))),
    ("a - (b - c)", BinOp("-", N("a"), BinOp("-", N("b"), N("c")))),
    ("a / b * c", BinOp("*", BinOp("/", N("a"), N("b")), N("c"))),
    ("-x", Neg(N("x"))),
    ("--x", N("x")),  # unary signs fold: an even number of minus signs cancels
    ("---x", Neg(N("x"))),
    ("-+-x", N("x")),
    ("- -3", Num(3.0)),
    ("-3", Num(-3.0)),
    ("+x", N("x")),
    ("-2 * x", BinOp("*", Num(-2.0), N("x"))),
    ("-x * y", BinOp("*", Neg(N("x")), N("y"))),
    ("2 * -x", BinOp("*", Num(2.0), Neg(N("x")))),
    ("a - -3", BinOp("-", N("a"), Num(-3.0))),
    ("-(a + b)", Neg(BinOp("+", N("a"), N("b")))),
    ("f()", Call("f", ())),
    ("kl(q, z)", Call("kl", (N("q"), N("z")))),
    ("x.detach()", Call("detach", (N("x"),))),
    ("detach(x)", Call("detach", (N("x"),))),
    ("dis.features(x)", Call("dis.features", (N("x"),))),
    ("dis.features(x).detach()", Call("detach", (Call("dis.features", (N("x"),)),))),
    ("(a + b).detach()", Call("detach", (BinOp("+", N("a"), N("b")),))),
    ("dec(z).detach()", Call("detach", (Call("dec", (N("z"),)),))),
    ("x.mean()", Call("x.mean", ())),  # on a bare name, `.NAME(...)` other than detach is a network tap
    ("adam(lr, betas=[0.5, 0.999])", Call("adam", (N("lr"),), (("betas", ListExpr((Num(0.5), Num(0.999)))),))),
    ("f(a, k=1, j=-b)", Call("f", (N("a"),), (("k", Num(1.0)), ("j", Neg(N("b")))))),
    ("f(k=g(x=1))", Call("f", (), (("k", Call("g", (), (("x", Num(1.0)),))),))),
    ("[]", ListExpr(())),
    ("[1, [2, x]]", ListExpr((Num(1.0), ListExpr((Num(2.0), N("x")))))),
    ("sqerr(x_rec, x) / (2 * sigma2)", BinOp("/", Call("sqerr", (N("x_rec"), N("x"))), BinOp("*", Num(2.0), N("sigma2")))),
    ("  rec +\tbeta*kl  ", BinOp("+", N("rec"), BinOp("*", N("beta"), N("kl")))),
]


@pytest.mark.parametrize("text, tree", PARSES, ids=[t for t, _ in PARSES])
def test_parse(text, tree):
    assert E.parse(text) == tree


@pytest.mark.parametrize("value, tree", [(3, Num(3.0)), (2.5, Num(2.5)), (-1, Num(-1.0))])
def test_yaml_numbers_are_accepted_as_they_are(value, tree):
    assert E.parse(value) == tree


ERRORS = [
    ("a +", "expected a name, a number or '(', found the end (at character 4)"),
    ("a $ b", "unexpected character '$' (at character 3)"),
    ("f(a, b", "expected ')', found the end (at character 7)"),
    ("f(a=1, b)", "positional argument after a keyword argument (at character 8)"),
    ("f(a=1, a=2)", "argument 'a' given twice (at character 8)"),
    ("(a", "expected ')', found the end (at character 3)"),
    ("[1, 2", "expected ']', found the end (at character 6)"),
    ("a b", "expected the end, found 'b' (at character 3)"),
    ("x.", "expected a name, found the end (at character 3)"),
    ("x.1()", "expected the end, found '.1' (at character 2)"),
    ("1 +* 2", "expected a name, a number or '(' (at character 4)"),
    ("a = b", "expected the end, found '=' (at character 3)"),
    ("a.b.c(x)", "expected '(', found '.' (at character 4)"),
    ("f(,)", "expected a name, a number or '(' (at character 3)"),
    ("x @ y", "unexpected character '@' (at character 3)"),
    ("", "empty expression"),
    ("   ", "empty expression"),
    (True, "expected an expression, not true/false"),
    (None, "expected an expression (a string), not NoneType"),
    ([1], "expected an expression (a string), not list"),
    ("x" * 2001, "expression longer than 2000 characters"),
    ("(" * 120 + "x" + ")" * 120, "expression nested too deeply"),
]


@pytest.mark.parametrize("text, message", ERRORS, ids=[repr(t)[:30] for t, _ in ERRORS])
def test_parse_errors_say_where(text, message):
    with pytest.raises(ExprError) as exc:
        E.parse(text)
    assert str(exc.value) == message


def test_error_position_points_at_the_offending_character():
    text = "kl(q, z) + beta * # kl"
    with pytest.raises(ExprError) as exc:
        E.parse(text)
    position = int(str(exc.value).rsplit("character ", 1)[1].rstrip(")"))
    assert text[position - 1] == "#"


@pytest.mark.parametrize("text, tree", [
    ("-" * 1500 + "x", N("x")),
    ("-" * 1501 + "x", Neg(N("x"))),
    ("+" * 1500 + "x", N("x")),
    ("a - " + "-" * 1500 + "3", BinOp("-", N("a"), Num(3.0))),
], ids=["1500 minus", "1501 minus", "1500 plus", "a - 1500 minus 3"])
def test_long_runs_of_signs_fold_without_recursion(text, tree):
    assert E.parse(text) == tree


# ---------------------------------------------------------------- names

def test_names_and_free_names():
    node = E.parse("dis.features(x) + kl(q, z) * beta - f(k=w)")
    assert E.names(node) == {"dis.features", "kl", "f", "x", "q", "z", "beta", "w"}
    assert E.free_names(node) == {"x", "q", "z", "beta", "w"}


# ---------------------------------------------------------------- to_text

TEXTS = [
    ("rec + beta * kl", "rec + beta * kl"),
    ("sqerr(x_rec,x)/(2*sigma2)", "sqerr(x_rec, x) / (2 * sigma2)"),
    ("(a + b) * c", "(a + b) * c"),
    ("a - (b - c)", "a - (b - c)"),
    ("a / (b * c)", "a / (b * c)"),
    ("a - (b + c)", "a - (b + c)"),
    ("-(a + b)", "-(a + b)"),
    ("-(a * b)", "-(a * b)"),
    ("-x * y", "-x * y"),
    ("x * -y", "x * -y"),
    ("a - -3", "a - -3"),
    ("x.detach()", "detach(x)"),
    ("dis.features(x)", "dis.features(x)"),
    ("adam(lr, betas=[0.5, 0.999])", "adam(lr, betas=[0.5, 0.999])"),
    ("1e-3 * x", "0.001 * x"),
    ("2.0", "2"),
    ("1e20", "1e+20"),
]


@pytest.mark.parametrize("text, canonical", TEXTS, ids=[t for t, _ in TEXTS])
def test_to_text(text, canonical):
    assert E.to_text(E.parse(text)) == canonical


@pytest.mark.parametrize("text", [t for t, _ in TEXTS + PARSES])
def test_to_text_round_trip(text):
    tree = E.parse(text)
    again = E.parse(E.to_text(tree))
    assert E.to_text(again) == E.to_text(tree)
    assert again == tree


@pytest.mark.parametrize("text", ["-(-x)", "-(-x) * y", "a - -(-b)"])
def test_to_text_of_a_parenthesised_double_negation_reads_back(text):
    tree = E.parse(text)
    assert E.parse(E.to_text(tree)) == tree


def test_to_text_canonicalises_associative_regrouping():
    # `+` and `*` regroup left: the text reads the same, the value is the same
    assert E.to_text(E.parse("a + (b + c)")) == "a + b + c"
    assert E.to_text(E.parse("a * (b / c)")) == "a * b / c"


@pytest.mark.parametrize("text", ["x * 0.1234567", "x + 1234567", "adam(0.00012345678)"])
def test_to_text_keeps_every_digit(text):
    tree = E.parse(text)
    assert E.parse(E.to_text(tree)) == tree
    assert E.to_text(tree) == text  # the shortest exact spelling, which here is the one written


def test_to_text_of_the_longest_sum_the_parser_takes():
    text = "+".join(["x"] * 201)  # 200 operations: the parser's bound
    assert E.to_text(E.parse(text)) == " + ".join(["x"] * 201)


@pytest.mark.parametrize("text", ["+".join(["x"] * 202), "+".join(["x"] * 600), "*".join(["-x"] * 150)])
def test_longer_expressions_are_expr_errors_not_crashes(text):
    # every later stage (to_text, the graph lint, the interpreter) walks the tree recursively
    assert len(text) < 2000
    with pytest.raises(ExprError) as exc:
        E.parse(text)
    assert str(exc.value) == "expression has more than 200 operations; split it into named losses"


# ---------------------------------------------------------------- constants

@pytest.mark.parametrize("text, params, value", [
    ("2 * lr", {"lr": 0.5}, 1.0),
    ("lr / 4 + 1", {"lr": 2}, 1.5),
    ("-lr", {"lr": 3}, -3.0),
    ("-(lr - 1)", {"lr": 3}, -2.0),
    ("[0.5, 0.999]", {}, [0.5, 0.999]),
    ("[1, [2, lr]]", {"lr": 1}, [1.0, [2.0, 1.0]]),
    ("true", {}, True),
    ("false", {}, False),
    (0.02, {}, 0.02),
])
def test_constant(text, params, value):
    result = E.constant(E.parse(text), params)
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize("text, params, message", [
    ("lr / 0", {"lr": 1}, "division by zero"),
    ("lr / (beta - beta)", {"lr": 1, "beta": 2}, "division by zero"),
    ("foo", {}, "'foo' is not a number or a param"),
    ("flag", {"flag": True}, "'flag' is not a number or a param"),
    ("lr", {"lr": "a"}, "'lr' is not a number or a param"),
    ("f(1)", {}, "expected a number, a param or a list of them here"),
    ("true + 1", {}, "expected a number"),
    ("-[1]", {}, "expected a number"),
    ("[1] * 2", {}, "expected a number"),
])
def test_constant_errors(text, params, message):
    with pytest.raises(ExprError) as exc:
        E.constant(E.parse(text), params)
    assert str(exc.value) == message
