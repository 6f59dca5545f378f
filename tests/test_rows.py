"""Layer-table rows: compact strings and mappings -> canonical mappings, and back."""

from __future__ import annotations

import pytest

from genspec.lang.registry import ACTIVATIONS, LAYER_OPS
from genspec.lang.rows import RowError, format_row, parse_row

# ---------------------------------------------------------------- compact rows

COMPACT = [
    # the examples of the rows.py docstring
    ("conv 64 5x5 /2, bn, relu", {"op": "conv", "out": 64, "kernel": 5, "stride": 2, "norm": "bn", "act": "relu"}),
    ("deconv 32 5x5 x2, bn, relu", {"op": "deconv", "out": 32, "kernel": 5, "stride": 2, "norm": "bn", "act": "relu"}),
    ("fc 8x8x256, bn, relu", {"op": "fc", "out": [256, 8, 8], "norm": "bn", "act": "relu"}),
    ("lrelu 0.2", {"op": "lrelu", "slope": 0.2}),
    ("gaussian 16 var=1e-6", {"op": "gaussian", "out": 16, "var": 1e-6}),
    ("conv 256 5x5 /2, relu  as feats", {"op": "conv", "out": 256, "kernel": 5, "stride": 2, "act": "relu", "name": "feats"}),
    # conv / deconv details
    ("conv 64 3x3", {"op": "conv", "out": 64, "kernel": 3, "stride": 1}),
    ("conv 64 3", {"op": "conv", "out": 64, "kernel": 3, "stride": 1}),
    ("conv 8 3x3 /2 pad 0", {"op": "conv", "out": 8, "kernel": 3, "stride": 2, "padding": 0}),
    ("conv 8 3x3 valid", {"op": "conv", "out": 8, "kernel": 3, "stride": 1, "padding": "valid"}),
    ("conv 8 3x3 same bias=false", {"op": "conv", "out": 8, "kernel": 3, "stride": 1, "padding": "same", "bias": False}),
    ("deconv 1 4x4 x2 pad 1 bias=no", {"op": "deconv", "out": 1, "kernel": 4, "stride": 2, "padding": 1, "bias": False}),
    ("deconv 16 3x3", {"op": "deconv", "out": 16, "kernel": 3, "stride": 1}),
    # dense heads
    ("fc 10", {"op": "fc", "out": 10}),
    ("fc 10 bias=false", {"op": "fc", "out": 10, "bias": False}),
    ("fc 4x7x3", {"op": "fc", "out": [3, 4, 7]}),
    ("gaussian 8", {"op": "gaussian", "out": 8}),
    ("gaussian 7x7x2 var=.5", {"op": "gaussian", "out": [2, 7, 7], "var": 0.5}),
    # activations
    ("lrelu", {"op": "lrelu", "slope": 0.01}),
    ("lrelu -0.1", {"op": "lrelu", "slope": -0.1}),
    ("relu", {"op": "relu"}),
    ("log_softmax", {"op": "log_softmax"}),
    ("fc 10, lrelu 0.2", {"op": "fc", "out": 10, "act": "lrelu", "slope": 0.2}),
    ("fc 10, lrelu", {"op": "fc", "out": 10, "act": "lrelu", "slope": 0.01}),
    # pooling, resampling and shape ops
    ("maxpool 2", {"op": "maxpool", "kernel": 2, "stride": 2}),
    ("avgpool 3", {"op": "avgpool", "kernel": 3, "stride": 3}),
    ("upsample 2", {"op": "upsample", "scale": 2, "mode": "nearest"}),
    ("upsample 4 bilinear", {"op": "upsample", "scale": 4, "mode": "bilinear"}),
    ("upsample 2 nearest", {"op": "upsample", "scale": 2, "mode": "nearest"}),
    ("dropout 0.5", {"op": "dropout", "p": 0.5}),
    ("dropout 0", {"op": "dropout", "p": 0.0}),
    ("flatten", {"op": "flatten"}),
    ("reshape 256 8 8", {"op": "reshape", "shape": [256, 8, 8]}),
    ("reshape 10", {"op": "reshape", "shape": [10]}),
    ("crop 2", {"op": "crop", "p": 2}),
    ("identity", {"op": "identity"}),
    ("bn", {"op": "bn"}),
    ("ln", {"op": "ln"}),
    # post-ops, taps, frozen
    ("fc 10, dropout 0.1", {"op": "fc", "out": 10, "dropout": 0.1}),
    ("conv 64 5x5 /2, ln, lrelu 0.2, dropout 0.3, frozen",
     {"op": "conv", "out": 64, "kernel": 5, "stride": 2, "norm": "ln", "act": "lrelu", "slope": 0.2, "dropout": 0.3, "frozen": True}),
    ("fc 10, frozen, bn", {"op": "fc", "out": 10, "frozen": True, "norm": "bn"}),
    ("fc 10, frozen", {"op": "fc", "out": 10, "frozen": True}),
    ("fc 10 as logits", {"op": "fc", "out": 10, "name": "logits"}),
    ("flatten as h", {"op": "flatten", "name": "h"}),
    ("maxpool 2, frozen  as pooled", {"op": "maxpool", "kernel": 2, "stride": 2, "frozen": True, "name": "pooled"}),
    ("  fc   10 ,  relu  ", {"op": "fc", "out": 10, "act": "relu"}),
]


@pytest.mark.parametrize("row, canonical", COMPACT, ids=[r for r, _ in COMPACT])
def test_compact_row_to_canonical_mapping(row, canonical):
    parsed = parse_row(row)
    assert parsed == canonical
    assert {type(v) for k, v in parsed.items() if k in ("out", "kernel", "stride", "scale")} <= {int, list}


def test_floats_in_rows_are_floats():
    assert type(parse_row("dropout 0")["p"]) is float
    assert type(parse_row("gaussian 4 var=1")["var"]) is float
    assert type(parse_row("lrelu 1")["slope"]) is float


@pytest.mark.parametrize("op", ACTIVATIONS + ("bn", "ln", "flatten", "identity"))
def test_every_argument_free_op_stands_alone(op):
    expected = {"op": op, "slope": 0.01} if op == "lrelu" else {"op": op}
    assert parse_row(op) == expected


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_closes_a_row(act):
    row = parse_row(f"conv 8 3x3, {act}")
    assert row["act"] == act


# ---------------------------------------------------------------- mapping rows

MAPPINGS = [
    ({"op": "conv", "out": 8, "kernel": 3}, {"op": "conv", "out": 8, "kernel": 3, "stride": 1}),
    ({"op": "deconv", "out": 8, "kernel": 4, "stride": 2, "padding": 1},
     {"op": "deconv", "out": 8, "kernel": 4, "stride": 2, "padding": 1}),
    ({"op": "maxpool", "kernel": 2}, {"op": "maxpool", "kernel": 2, "stride": 2}),
    ({"op": "avgpool", "kernel": 3, "stride": 1}, {"op": "avgpool", "kernel": 3, "stride": 1}),
    ({"op": "upsample", "scale": 2}, {"op": "upsample", "scale": 2, "mode": "nearest"}),
    ({"op": "lrelu"}, {"op": "lrelu", "slope": 0.01}),
    ({"op": "fc", "out": 3, "act": "lrelu"}, {"op": "fc", "out": 3, "act": "lrelu", "slope": 0.01}),
    ({"op": "fc", "out": 3, "act": "lrelu", "slope": 0.3}, {"op": "fc", "out": 3, "act": "lrelu", "slope": 0.3}),
    ({"op": "gaussian", "out": [2, 4, 4], "name": "q"}, {"op": "gaussian", "out": [2, 4, 4], "name": "q"}),
    ({"op": "relu"}, {"op": "relu"}),
]


@pytest.mark.parametrize("row, canonical", MAPPINGS)
def test_mapping_rows_get_their_defaults(row, canonical):
    original = dict(row)
    assert parse_row(row) == canonical
    assert row == original  # the caller's mapping is not modified


def test_a_compact_row_and_its_canonical_mapping_agree():
    for text, _ in COMPACT:
        canonical = parse_row(text)
        assert parse_row(canonical) == canonical


# ---------------------------------------------------------------- errors

ERRORS = [
    ("convolution 64 5x5", "unknown layer 'convolution'; known: " + ", ".join(LAYER_OPS)),
    ("CONV 8 3x3", "unknown layer 'CONV'; known: " + ", ".join(LAYER_OPS)),
    ("conv 64 5x3", "kernel '5x3': only square kernels (KxK) are supported"),
    ("conv 64 3x3x3", "kernel '3x3x3': only square kernels (KxK) are supported"),
    ("conv 64", "expected 'conv CHANNELS KxK' then optional '/STRIDE', 'pad N' / 'valid', 'bias=false'"),
    ("conv 64 big", "'big' is not a kernel size: expected 'conv CHANNELS KxK' then optional '/STRIDE', 'pad N' / 'valid', 'bias=false'"),
    ("conv 64 5x5 x2", "unexpected 'x2': expected 'conv CHANNELS KxK' then optional '/STRIDE', 'pad N' / 'valid', 'bias=false'"),
    ("deconv 64 5x5 /2", "unexpected '/2': expected 'deconv CHANNELS KxK' then optional 'xSCALE', 'pad N' / 'valid', 'bias=false'"),
    ("conv 8 3x3 pad", "unexpected 'pad': expected 'conv CHANNELS KxK' then optional '/STRIDE', 'pad N' / 'valid', 'bias=false'"),
    ("conv 0 3x3", "channels, kernel and stride must be positive"),
    ("conv 8 0x0", "channels, kernel and stride must be positive"),
    ("conv 8 3x3 /0", "channels, kernel and stride must be positive"),
    ("conv 8 3x3 bias=maybe", "expected true or false, got 'maybe'"),
    ("conv 64 5x5, relu, bn", "'bn' comes too late: write norm, then activation, then dropout (or split the row)"),
    ("conv 64 5x5, dropout 0.5, relu", "'relu' comes too late: write norm, then activation, then dropout (or split the row)"),
    ("conv 64 5x5, dropout 0.5, ln", "'ln' comes too late: write norm, then activation, then dropout (or split the row)"),
    ("conv 64 5x5, bn, bn", "'bn': this row already has a norm"),
    ("conv 64 5x5, bn, ln", "'ln': this row already has a norm"),
    ("fc 10, dropout 0.1, dropout 0.2", "'dropout 0.2': this row already has a dropout"),
    ("fc 0", "sizes must be positive"),
    ("fc 4x0", "sizes must be positive"),
    ("fc", "expected 'fc N' or 'fc HxWxC' and optional 'bias=false'"),
    ("fc 10 var=1", "unexpected 'var=1': expected 'fc N' or 'fc HxWxC' and optional 'bias=false'"),
    ("gaussian 8 var=0", "unexpected 'var=0': expected 'gaussian N' or 'gaussian HxWxC' and optional 'var=V' and "
                         "optional 'bias=false'"),
    ("gaussian 8 var=-1", "unexpected 'var=-1': expected 'gaussian N' or 'gaussian HxWxC' and optional 'var=V' and "
                          "optional 'bias=false'"),
    ("gaussian 8, relu", "a gaussian head is the network's output: it takes no norm, activation or dropout"),
    ("gaussian 8, bn, frozen", "a gaussian head is the network's output: it takes no norm, activation or dropout"),
    ({"op": "gaussian", "out": 8, "dropout": 0.5},
     "a gaussian head is the network's output: it takes no norm, activation or dropout"),
    ("fc 128 relu", "unexpected 'relu': expected 'fc N' or 'fc HxWxC' and optional 'bias=false'"),
    ("upsample 2 bicubic", "unknown upsampling mode 'bicubic'; known: nearest, bilinear"),
    ("upsample", "expected 'upsample SCALE' and optional mode (nearest, bilinear)"),
    ("upsample 0", "expected 'upsample SCALE' and optional mode (nearest, bilinear)"),
    ("dropout 1", "dropout: expected a probability in [0, 1), e.g. 'dropout 0.3'"),
    ("dropout", "dropout: expected a probability in [0, 1), e.g. 'dropout 0.3'"),
    ("fc 10, dropout 1.5", "dropout: expected a probability in [0, 1), e.g. 'dropout 0.3'"),
    ("maxpool", "maxpool: expected a window and optional stride, e.g. 'maxpool 2' or 'maxpool 3 /1'"),
    ("maxpool 0", "maxpool: expected a window and optional stride, e.g. 'maxpool 2' or 'maxpool 3 /1'"),
    ("maxpool 0 /1", "maxpool: expected a window and optional stride, e.g. 'maxpool 2' or 'maxpool 3 /1'"),
    ("maxpool 3 /0", "maxpool: the stride must be positive"),
    ("maxpool 3 /1 /1", "maxpool: expected a window and optional stride, e.g. 'maxpool 2' or 'maxpool 3 /1'"),
    ("avgpool 2 2", "avgpool: expected a window and optional stride, e.g. 'avgpool 2' or 'avgpool 3 /1'"),
    ("crop 0", "crop: expected pixels to remove from each border, e.g. 'crop 2'"),
    ("reshape", "reshape takes the target shape as integers, e.g. 'reshape 256 8 8'"),
    ("reshape 2 x", "reshape takes the target shape as integers, e.g. 'reshape 256 8 8'"),
    ("relu 3", "relu takes no arguments, got '3'"),
    ("flatten 2 3", "flatten takes no arguments, got '2 3'"),
    ("lrelu a", "lrelu: expected a negative slope, e.g. 'lrelu 0.2'"),
    ("fc 10, relu 2", "unexpected 'relu 2' after the layer; expected a norm (bn, ln, vbn), an activation (relu, lrelu, tanh, "
                      "sigmoid, elu, gelu, silu, softplus, softmax, log_softmax), 'dropout P', 'frozen', 'sn' or 'as NAME'"),
    ("fc 10, bn as", "unexpected 'bn as' after the layer; expected a norm (bn, ln, vbn), an activation (relu, lrelu, tanh, "
                     "sigmoid, elu, gelu, silu, softplus, softmax, log_softmax), 'dropout P', 'frozen', 'sn' or 'as NAME'"),
    ("fc 10, relu as 1x", "tap name '1x' must be a plain name"),
    ("fc 10,, relu", "empty part between commas"),
    ("fc 10, relu,", "empty part between commas"),
    ("", "empty row"),
    ("   ", "empty row"),
    (5, "a row is a string like 'conv 64 5x5 /2, bn, relu' or a mapping, not int"),
    (None, "a row is a string like 'conv 64 5x5 /2, bn, relu' or a mapping, not NoneType"),
    (["fc 10"], "a row is a string like 'conv 64 5x5 /2, bn, relu' or a mapping, not list"),
    ({"op": "conv"}, "conv needs out, kernel"),
    ({"op": "dropout", "p": 1.5}, "dropout: p must be in [0, 1), got 1.5"),
    ({"op": "crop", "p": 0}, "crop: p is a whole number of pixels >= 1, got 0"),
    ({"op": "crop", "p": 1.5}, "crop: p is a whole number of pixels >= 1, got 1.5"),
    ({"op": "crop", "p": True}, "crop: p is a whole number of pixels >= 1, got True"),
    ({"op": "reshape"}, "reshape needs shape"),
    ({"op": "nope"}, "a mapping row needs 'op', one of: " + ", ".join(LAYER_OPS)),
    ({}, "a mapping row needs 'op', one of: " + ", ".join(LAYER_OPS)),
    ({"op": "fc", "out": 8, "kernal": 3}, "unknown key 'kernal' in a layer row; known: op, out, kernel, stride, padding, "
                                          "scale, mode, p, shape, slope, var, bias, norm, act, dropout, frozen, sn, name, input, block, args"),
]


@pytest.mark.parametrize("row, message", ERRORS, ids=[repr(r) for r, _ in ERRORS])
def test_row_errors_say_what_was_expected(row, message):
    with pytest.raises(RowError) as exc:
        parse_row(row)
    assert str(exc.value) == message


def test_two_activations_is_an_error():
    with pytest.raises(RowError) as exc:
        parse_row("conv 64 5x5, relu, tanh")
    assert str(exc.value) == "'tanh': this row already has an activation"


@pytest.mark.parametrize("row", ["fc " + "9" * 5000, "conv 8 " + "3" * 5000, "reshape " + "2" * 5000,
                                 "fc 9999999999", "lrelu 0." + "1" * 5000, "gaussian 8 var=1e-1000"])
def test_huge_numbers_are_row_errors(row):
    # longer than Python's 4300-digit int limit, or than any layer size: a RowError, never a ValueError
    with pytest.raises(RowError):
        parse_row(row)


@pytest.mark.parametrize("row", ["gaussian 8 var=1e400", "lrelu 1e400", "fc 10, lrelu -1e400"])
def test_numbers_that_overflow_to_infinity_are_row_errors(row):
    with pytest.raises(RowError):
        parse_row(row)


# ---------------------------------------------------------------- format_row

@pytest.mark.parametrize("row, text", [
    ("conv 64 5x5 /2, bn, relu", "conv 64 5x5 /2, bn, relu"),
    ("conv 64 3 pad 1 bias=false", "conv 64 3x3 pad 1 bias=false"),
    ("deconv 8 4x4 x2 pad 1 bias=no", "deconv 8 4x4 x2 pad 1 bias=false"),
    ("fc 8x8x256, bn, relu", "fc 8x8x256, bn, relu"),
    ("gaussian 16 var=1e-6", "gaussian 16 var=1e-06"),
    ("lrelu", "lrelu 0.01"),
    ("fc 10, frozen, bn", "fc 10, bn, frozen"),
    ("upsample 2 nearest", "upsample 2"),
    ("conv 256 5x5 /2, relu as feats", "conv 256 5x5 /2, relu  as feats"),
])
def test_format_row_prints_the_canonical_compact_form(row, text):
    assert format_row(parse_row(row)) == text


ROUND_TRIP = [r for r, _ in COMPACT] + [
    "conv 3 1x1 /4 valid, ln, softplus, dropout 0.25  as out",
    "deconv 3 5x5 x2 pad 2 bias=false, bn, tanh",
    "fc 1x1x1, sigmoid",
    "gaussian 4x4x8",
    "gaussian 8 var=0.001",
    "avgpool 4, frozen",
    "crop 3",
    "lrelu 0.333",
    "maxpool 3 /1",
    "avgpool 3 /2, frozen",
    "gaussian 8 bias=false",
    "gaussian 8 var=0.5 bias=false",
    "fc 10, relu, dropout 0",
]


@pytest.mark.parametrize("row", ROUND_TRIP)
def test_format_row_round_trip(row):
    canonical = parse_row(row)
    assert parse_row(format_row(canonical)) == canonical


@pytest.mark.parametrize("row", [
    {"op": "conv", "out": 8, "kernel": 3, "stride": 2, "padding": "valid", "bias": False, "norm": "bn", "act": "elu"},
    {"op": "fc", "out": [4, 2, 3], "act": "lrelu", "slope": 0.5, "dropout": 0.5, "frozen": True, "name": "h"},
    {"op": "upsample", "scale": 3, "mode": "bilinear"},
    {"op": "reshape", "shape": [1, 2, 3]},
])
def test_format_row_round_trip_of_mapping_rows(row):
    canonical = parse_row(row)
    assert parse_row(format_row(canonical)) == canonical


@pytest.mark.parametrize("row", ["lrelu 0.1234567", "gaussian 8 var=0.00012345678", "fc 10, relu, dropout 0.1234567"])
def test_format_row_keeps_every_digit(row):
    canonical = parse_row(row)
    assert parse_row(format_row(canonical)) == canonical
    assert format_row(canonical) == row


def test_format_row_keeps_a_zero_dropout():
    canonical = parse_row("fc 10, relu, dropout 0")
    assert format_row(canonical) == "fc 10, relu, dropout 0"
    assert parse_row(format_row(canonical)) == canonical


@pytest.mark.parametrize("row, text", [
    ({"op": "maxpool", "kernel": 3, "stride": 1}, "maxpool 3 /1"),
    ({"op": "avgpool", "kernel": 2, "stride": 2}, "avgpool 2"),
    ({"op": "gaussian", "out": 8, "bias": False}, "gaussian 8 bias=false"),
])
def test_format_row_round_trip_of_what_was_once_mapping_only(row, text):
    # a pool whose stride differs from its window and a gaussian without bias now have compact forms
    canonical = parse_row(row)
    assert format_row(canonical) == text
    assert parse_row(format_row(canonical)) == canonical


@pytest.mark.parametrize("row, message", [
    ({"op": "fc", "out": 3, "stride": 2}, "'stride' does not apply to fc rows; they take act, bias, dropout, frozen, name, norm, out"),
    ({"op": "bn", "bias": False}, "'bias' does not apply to bn rows"),
    ({"op": "relu", "slope": 0.2}, "'slope' does not apply to relu rows"),
    ({"op": "maxpool", "kernel": 2, "padding": 1}, "'padding' does not apply to maxpool rows"),
    ({"op": "reshape", "shape": [1, 8, 8], "out": 64}, "'out' does not apply to reshape rows"),
])
def test_a_mapping_key_the_op_does_not_read_is_an_error(row, message):
    # silently ignored, a stride on an fc row would build a network other than the one written
    with pytest.raises(RowError) as exc:
        parse_row(row)
    assert message in str(exc.value)


def test_a_tap_may_stand_as_a_part_of_its_own():
    assert parse_row("fc 32, relu, as h") == parse_row("fc 32, relu as h") == {"name": "h", "op": "fc", "out": 32, "act": "relu"}
