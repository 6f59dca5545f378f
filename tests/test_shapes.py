"""Shape inference and parameter counts (plain Python), checked against hand computations."""

from __future__ import annotations

import pytest

from genspec.lang.rows import parse_row
from genspec.lang.shapes import ShapeError, conv_padding, deconv_padding, fmt, infer_network


def infer(input_shape, *rows, freeze=False):
    return infer_network(input_shape, [parse_row(r) for r in rows], freeze)


# (input shape, row, output shape, parameters), each worked out by hand:
#   conv:   out = (h + 2p - k) // s + 1, params = out_c * in_c * k * k + out_c
#   deconv: out = (h - 1) * s - 2p + k + output_padding, params = in_c * out_c * k * k + out_c
CASES = [
    # 'same' padding (k-1)//2 = 2: (28 + 4 - 5)//2 + 1 = 14
    ((1, 28, 28), "conv 64 5x5 /2", (64, 14, 14), 64 * 1 * 25 + 64),
    # k=4 /2 from 64: p = 1, (64 + 2 - 4)//2 + 1 = 32
    ((3, 64, 64), "conv 64 4x4 /2", (64, 32, 32), 64 * 3 * 16 + 64),
    ((1, 8, 8), "conv 8 3x3", (8, 8, 8), 8 * 9 + 8),
    ((1, 8, 8), "conv 8 3x3 valid", (8, 6, 6), 8 * 9 + 8),
    ((1, 8, 8), "conv 8 3x3 pad 2", (8, 10, 10), 8 * 9 + 8),
    ((2, 9, 9), "conv 4 3x3 /2 valid bias=false", (4, 4, 4), 4 * 2 * 9),
    ((3, 5, 5), "conv 6 1x1", (6, 5, 5), 6 * 3 + 6),
    ((3, 8, 8), "conv 16 3x3, bn, relu", (16, 8, 8), 16 * 3 * 9 + 16 + 2 * 16),
    ((3, 8, 8), "conv 16 3x3, ln", (16, 8, 8), 16 * 3 * 9 + 16 + 2 * 16 * 8 * 8),
    # deconv 5x5 x2: p = ceil(3/2) = 2, output_padding = 2 + 4 - 5 = 1: (7-1)*2 - 4 + 5 + 1 = 14
    ((64, 7, 7), "deconv 32 5x5 x2", (32, 14, 14), 64 * 32 * 25 + 32),
    # deconv 4x4 x2: p = 1, output_padding 0: (4-1)*2 - 2 + 4 = 8
    ((8, 4, 4), "deconv 1 4x4 x2", (1, 8, 8), 8 * 1 * 16 + 1),
    ((8, 4, 4), "deconv 2 3x3 x2 bias=false, bn", (2, 8, 8), 8 * 2 * 9 + 2 * 2),
    ((1, 4, 4), "deconv 1 3x3 valid", (1, 6, 6), 9 + 1),
    ((1, 4, 4), "deconv 1 3x3 x2 pad 0", (1, 9, 9), 9 + 1),
    ((4, 5, 5), "deconv 4 3x3", (4, 5, 5), 4 * 4 * 9 + 4),
    # pooling: (h - k)//s + 1
    ((8, 7, 7), "maxpool 2", (8, 3, 3), 0),
    ((1, 8, 8), "avgpool 3", (1, 2, 2), 0),
    ((3, 4, 4), "maxpool 4", (3, 1, 1), 0),
    # dense
    ((100,), "fc 10", (10,), 100 * 10 + 10),
    ((1, 8, 8), "fc 10 bias=false", (10,), 64 * 10),
    ((100,), "fc 4x4x16", (16, 4, 4), 100 * 256 + 256),
    ((64,), "fc 128, ln", (128,), 64 * 128 + 128 + 2 * 128),
    ((64,), "fc 128, bn, relu, dropout 0.5", (128,), 64 * 128 + 128 + 2 * 128),
    # gaussian: mean and log-variance (2n outputs), or the mean only with a fixed var
    ((64,), "gaussian 16", (16,), 64 * 32 + 32),
    ((64,), "gaussian 16 var=1e-6", (16,), 64 * 16 + 16),
    ((2, 3, 3), "gaussian 2x2x3", (3, 2, 2), 18 * 24 + 24),
    # shape ops and parameter-free rows
    ((8, 4, 4), "upsample 2", (8, 8, 8), 0),
    ((8, 4, 4), "upsample 3 bilinear", (8, 12, 12), 0),
    ((8, 6, 6), "crop 2", (8, 2, 2), 0),
    ((8, 4, 4), "flatten", (128,), 0),
    ((128,), "reshape 8 4 4", (8, 4, 4), 0),
    ((8, 4, 4), "reshape 2 64", (2, 64), 0),
    ((8, 4, 4), "bn", (8, 4, 4), 16),
    ((32,), "bn", (32,), 64),
    ((8, 4, 4), "ln", (8, 4, 4), 2 * 128),
    ((8, 4, 4), "dropout 0.3", (8, 4, 4), 0),
    ((8, 4, 4), "lrelu 0.2", (8, 4, 4), 0),
    ((8, 4, 4), "identity", (8, 4, 4), 0),
    ((8,), "softmax", (8,), 0),
]


@pytest.mark.parametrize("input_shape, row, output, params", CASES, ids=[f"{fmt(c[0])}-{c[1]}" for c in CASES])
def test_row_shape_and_parameters(input_shape, row, output, params):
    info = infer(input_shape, row)
    (r,) = info.rows
    assert r.in_shape == tuple(input_shape)
    assert r.out_shape == output
    assert info.output == output
    assert r.params == params
    assert info.trainable == params and info.frozen == 0


def test_a_whole_table():
    # a DCGAN-style generator for 1x32x32 images from a 100-d latent
    info = infer((100,), "fc 4x4x256", "reshape 256 4 4", "bn", "relu", "deconv 128 4x4 x2, bn, relu",
                 "deconv 64 4x4 x2, bn, relu", "deconv 1 4x4 x2, tanh")
    assert [r.out_shape for r in info.rows] == [(256, 4, 4), (256, 4, 4), (256, 4, 4), (256, 4, 4), (128, 8, 8),
                                                (64, 16, 16), (1, 32, 32)]
    expected = [100 * 4096 + 4096, 0, 512, 0, 256 * 128 * 16 + 128 + 256, 128 * 64 * 16 + 64 + 128, 64 * 16 + 1]
    assert [r.params for r in info.rows] == expected
    assert info.trainable == sum(expected)
    assert info.kind == "tensor" and info.input == (100,) and info.output == (1, 32, 32)


def test_gaussian_head_makes_a_distribution_network():
    info = infer((1, 8, 8), "flatten", "fc 32, relu", "gaussian 8")
    assert info.kind == "dist"
    assert info.output == (8,)


def test_taps():
    info = infer((1, 8, 8), "conv 4 3x3 as c1", "flatten", "fc 8 as h", "fc 2")
    assert info.taps == {"c1": 0, "h": 2}


def test_padding_helpers():
    # (left, right, top, bottom); 'same' gives ceil(size / stride) like TensorFlow's 'same'
    assert conv_padding({"kernel": 5, "stride": 1}, 8, 8) == (2, 2, 2, 2)
    assert conv_padding({"kernel": 5, "stride": 2}, 28, 28) == (2, 2, 2, 2)
    assert conv_padding({"kernel": 5, "stride": 1, "padding": "valid"}, 8, 8) == (0, 0, 0, 0)
    assert conv_padding({"kernel": 5, "stride": 1, "padding": 3}, 8, 8) == (3, 3, 3, 3)
    # even kernels: total k - 1 at stride 1, the extra pixel right and bottom
    assert conv_padding({"kernel": 4, "stride": 1}, 8, 8) == (1, 2, 1, 2)
    assert conv_padding({"kernel": 2, "stride": 1}, 8, 8) == (0, 1, 0, 1)
    # at stride 2: total = (ceil(n/2) - 1) * 2 + k - n, per axis
    assert conv_padding({"kernel": 4, "stride": 2}, 64, 64) == (1, 1, 1, 1)
    assert conv_padding({"kernel": 4, "stride": 2}, 7, 8) == (1, 1, 1, 2)
    assert conv_padding({"kernel": 2, "stride": 2}, 8, 8) == (0, 0, 0, 0)
    assert deconv_padding({"kernel": 4, "stride": 2}) == (1, 0)
    assert deconv_padding({"kernel": 5, "stride": 2}) == (2, 1)
    assert deconv_padding({"kernel": 3, "stride": 1}) == (1, 0)
    assert deconv_padding({"kernel": 1, "stride": 2}) == (0, 1)
    assert deconv_padding({"kernel": 4, "stride": 2, "padding": "valid"}) == (0, 0)
    assert deconv_padding({"kernel": 4, "stride": 2, "padding": 2}) == (2, 0)


def test_fmt():
    assert fmt((1, 8, 8)) == "1x8x8"
    assert fmt((16,)) == "16"
    assert fmt(()) == "scalar"


# ---------------------------------------------------------------- freezing

TABLE = ("flatten", "fc 16, relu", "fc 8, bn", "relu", "fc 4")
PARAMS = [0, 64 * 16 + 16, 16 * 8 + 8 + 16, 0, 8 * 4 + 4]


def test_nothing_frozen_by_default():
    info = infer((1, 8, 8), *TABLE)
    assert [r.params for r in info.rows] == PARAMS
    assert info.trainable == sum(PARAMS) and info.frozen == 0
    assert not any(r.frozen for r in info.rows)


def test_freeze_true_freezes_every_row():
    info = infer((1, 8, 8), *TABLE, freeze=True)
    assert info.trainable == 0 and info.frozen == sum(PARAMS)
    assert all(r.frozen for r in info.rows)


def test_freeze_all_but_last_keeps_only_the_last_row_with_parameters_trainable():
    info = infer((1, 8, 8), *TABLE, freeze="all_but_last")
    assert [r.frozen for r in info.rows] == [False, True, True, False, False]
    assert info.trainable == PARAMS[4]
    assert info.frozen == PARAMS[1] + PARAMS[2]


def test_freeze_all_but_last_when_the_last_row_has_no_parameters():
    info = infer((4,), "fc 8", "fc 3", "softmax", freeze="all_but_last")
    assert [r.frozen for r in info.rows] == [True, False, False]
    assert info.trainable == 8 * 3 + 3 and info.frozen == 4 * 8 + 8


def test_per_row_frozen():
    info = infer((1, 8, 8), "flatten", "fc 16, relu, frozen", "fc 8, bn", "relu", "fc 4, frozen")
    assert [r.frozen for r in info.rows] == [False, True, False, False, True]
    assert info.frozen == PARAMS[1] + PARAMS[4]
    assert info.trainable == PARAMS[2]


def test_freeze_false_keeps_per_row_frozen():
    info = infer((4,), "fc 2, frozen", "fc 2", freeze=False)
    assert [r.frozen for r in info.rows] == [True, False]


# ---------------------------------------------------------------- errors

SHAPE_ERRORS = [
    ((64,), ["conv 8 3x3"], 0, "conv needs a CxHxW input, got 64"),
    ((1, 8, 8), ["flatten", "maxpool 2"], 1, "maxpool needs a CxHxW input, got 64"),
    ((1, 8, 8), ["flatten", "fc 10", "upsample 2"], 2, "upsample needs a CxHxW input, got 10"),
    ((1, 2, 2), ["conv 8 5x5 valid"], 0, "a 5x5 conv does not fit a 1x2x2 input"),
    ((1, 8, 8), ["maxpool 2", "maxpool 2", "maxpool 4"], 2, "a 4x4 pool does not fit a 1x2x2 input"),
    ((1, 4, 4), ["crop 2"], 0, "cropping 2 from each border of 1x4x4 leaves nothing"),
    ((1, 8, 8), ["flatten", "reshape 8 9"], 1, "cannot reshape 64 (64 values) to 8x9 (72)"),
    ((1, 8, 8), ["deconv 4 4x4"], 0, "a 4x4 transposed conv cannot scale by exactly x1; give 'pad N' explicitly"),
    ((1, 2, 2), ["deconv 4 3x3 pad 5"], 0, "padding too large for a 1x2x2 input"),
    ((1, 8, 8), ["flatten", "gaussian 8", "fc 2"], 2, "rows after a gaussian head: the head must be the last row"),
    ((4,), ["reshape 2 2", "bn"], 1, "batch norm needs a flat or CxHxW input, got 2x2"),
    ((4,), ["reshape 2 2", "relu", "identity", "fc 4, bn"], 3, None),  # fine: fc output is flat
    ((4,), ["fc 2 as h", "fc 2 as h"], 1, "tap name 'h' used twice"),
]


@pytest.mark.parametrize("input_shape, rows, index, message", SHAPE_ERRORS, ids=[str(e[1]) for e in SHAPE_ERRORS])
def test_shape_errors_name_the_row(input_shape, rows, index, message):
    if message is None:
        infer(input_shape, *rows)
        return
    with pytest.raises(ShapeError) as exc:
        infer(input_shape, *rows)
    assert exc.value.index == index
    assert str(exc.value) == message


def test_bn_after_a_multidimensional_fc_is_per_channel():
    info = infer((100,), "fc 4x4x16, bn, relu")
    # linear 100*256 + 256, then BatchNorm2d(16) on the reshaped 16x4x4 output: 2*16
    assert info.rows[0].out_shape == (16, 4, 4)
    assert info.rows[0].params == 100 * 256 + 256 + 2 * 16


def test_same_padding_keeps_size_at_stride_1_for_even_kernels():
    assert infer((1, 8, 8), "conv 8 4x4 same").output == (8, 8, 8)


@pytest.mark.parametrize("size, row, out", [
    (7, "conv 8 4x4 /2", 4), (8, "conv 8 4x4 /2", 4), (9, "conv 8 3x3 /2", 5), (9, "conv 8 2x2 /3", 3),
    (5, "conv 8 6x6", 5), (1, "conv 8 4x4", 1),
])
def test_same_padding_gives_ceil_of_size_over_stride(size, row, out):
    assert infer((1, size, size), row).output == (8, out, out)
