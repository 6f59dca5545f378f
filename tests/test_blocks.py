"""Blocks and skips in layer tables: `blocks:` definitions used as one row (`block NAME k=v`),
`add NAME` / `concat NAME` of an earlier row's output; their shapes, errors, modules and listing."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import genspec
from genspec.compiler.layers import Block, build_network
from genspec.errors import SpecError, format_path
from genspec.lang.rows import RowError, format_row, parse_row
from genspec.report.diff import diff_specs, render_text
from spec_helpers import REPO, check, cli_in_process

RESNET_GAN = REPO / "specs" / "zoo" / "resnet_gan.yaml"

# An autoencoder of the 8x8 digits whose table uses a residual block twice: once keeping the
# channels (the input is added as it is), once doubling them and the stride (its shortcut runs).
SPEC = """\
genspec: 1
name: blocks
data: {dataset: digits, split: {train: 64, test: 32}}
blocks:
  res:
    params: {ch: null, stride: 1}
    layers: ["conv {ch} 3x3 /{stride}, relu", "conv {ch} 3x3"]
    skip: add
    shortcut: ["conv {ch} 1x1 /{stride}"]
networks:
  net:
    input: x
    layers: ["conv 8 3x3, relu", "block res ch=8", "block res ch=16 stride=2, relu", flatten, fc 64, reshape 1 8 8, sigmoid]
graph: {x_rec: net(x)}
losses: {rec: "mse(x_rec, x)"}
objectives: {net: {minimize: rec, optimizer: adam(1e-3)}}
train: {epochs: 1, batch_size: 16, seed: 0, device: cpu}
"""


def spec_with(*replacements: tuple[str, str]) -> str:
    text = SPEC
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def problems(text: str) -> list[str]:
    """The problems of a spec as `key.path: message`, without the file position."""
    with pytest.raises(SpecError) as exc:
        check(text)
    return [f"{format_path(p.path)}: {p.message}" for p in exc.value.problems]


# ---------------------------------------------------------------- rows

def test_block_and_skip_rows_parse_to_canonical_mappings_and_back():
    row = parse_row("block res ch=64 stride=2 act=lrelu w=0.5, relu, sn  as h")
    assert row == {"op": "block", "block": "res", "args": {"ch": 64, "stride": 2, "act": "lrelu", "w": 0.5},
                   "act": "relu", "sn": True, "name": "h"}
    assert parse_row(format_row(row)) == row
    assert parse_row("add h, relu") == {"op": "add", "input": "h", "act": "relu"}
    assert parse_row("concat feats") == {"op": "concat", "input": "feats"}
    assert parse_row({"op": "block", "block": "res", "args": {"ch": 8}}) == {"op": "block", "block": "res", "args": {"ch": 8}}
    assert format_row(parse_row("block res w=2.0")) == "block res w=2.0"  # a float stays a float


@pytest.mark.parametrize("text, message", [
    ("block", "expected 'block NAME' and its params as NAME=VALUE, e.g. 'block res ch=64'"),
    ("block res 64", "unexpected '64': expected 'block NAME' and its params as NAME=VALUE, e.g. 'block res ch=64'"),
    ("block res ch=1 ch=2", "block res: ch is given twice"),
    ("block res ch=a,b", "unexpected 'b' after the layer; expected a norm (bn, ln, vbn), an activation (relu, lrelu, "
                         "tanh, sigmoid, elu, gelu, silu, softplus, softmax, log_softmax), 'dropout P', 'frozen', 'sn' or 'as NAME'"),
    ("block res ch={x}", "'{x}' is not a param value: write a number or a plain word such as relu"),
    ("add", "add takes the tap name of an earlier row (one written '... as NAME'), e.g. 'add h'"),
    ("relu, sn", "'sn' (spectral normalisation of a weight) applies to conv, deconv, fc rows and to blocks "
                 "(their rows of those kinds), not 'relu'"),
])
def test_bad_block_and_skip_rows_say_what_was_expected(text, message):
    with pytest.raises(RowError) as exc:
        parse_row(text)
    assert str(exc.value) == message


# ---------------------------------------------------------------- expansion and shapes

def test_a_block_row_expands_to_its_rows_with_the_params_substituted():
    net = check(SPEC).networks["net"]
    row = net.rows[2]
    assert row["args"] == {"ch": 16, "stride": 2} and row["skip"] == "add" and row["act"] == "relu"
    assert [format_row(r) for r in row["layers"]] == ["conv 16 3x3 /2, relu", "conv 16 3x3"]
    assert [format_row(r) for r in row["shortcut"]] == ["conv 16 1x1 /2"]
    assert net.rows[1]["args"] == {"ch": 8, "stride": 1}  # the default
    info = net.info.rows
    assert [r.out_shape for r in info[:3]] == [(8, 8, 8), (8, 8, 8), (16, 4, 4)]
    assert [r.out_shape for r in info[2].layers] == [(16, 4, 4), (16, 4, 4)]
    # the shortcut runs only where the shapes differ: not in the first block
    assert info[1].shortcut == [] and [r.out_shape for r in info[2].shortcut] == [(16, 4, 4)]
    conv = lambda c_in, c_out, k: c_in * c_out * k * k + c_out
    assert info[1].params == 2 * conv(8, 8, 3)
    assert info[2].params == conv(8, 16, 3) + conv(16, 16, 3) + conv(8, 16, 1)


def test_nested_blocks_and_a_concat_skip():
    text = spec_with(("blocks:\n", """blocks:
  dense:
    params: {k: 4}
    layers: ["conv {k} 3x3, relu"]
    skip: concat
  two:
    params: {k: null}
    layers: ["block dense k={k}", "block dense k={k}"]
"""), ('"block res ch=8", ', '"block two k=4", '))
    info = check(text).networks["net"].info.rows[1]
    assert info.out_shape == (16, 8, 8)  # 8 channels, and 4 joined by each dense block
    assert [inner.out_shape for inner in info.layers] == [(12, 8, 8), (16, 8, 8)]
    assert [r.row["block"] for r in info.layers] == ["dense", "dense"]


@pytest.mark.parametrize("replacements, expected", [
    ([('"block res ch=8"', '"block rse ch=8"')], ["networks.net.layers[1]: no block named 'rse'; did you mean 'res'?"]),
    ([('"block res ch=8"', '"block res"')],
     ["networks.net.layers[1]: block res needs ch (e.g. 'block res ch=64'); its params: ch, stride=1"]),
    ([('"block res ch=8"', '"block res ch=8 strid=2"')],
     ["networks.net.layers[1]: block res has no param 'strid'; did you mean 'stride'?"]),
    ([('"block res ch=8"', '"block res ch=0"')],
     ["networks.net.layers[1]: in block res, blocks.res.layers[0] 'conv 0 3x3 /1, relu': channels, kernel and stride "
      "must be positive"]),
    ([('"conv {ch} 3x3"]', '"conv {chan} 3x3"]')],
     ["blocks.res.layers[1]: block res: {chan} is not a param of this block; did you mean 'ch'?"]),
    ([("params: {ch: null, stride: 1}", "params: {ch: null, stride: 1, pad: 1}")],
     ["blocks.res.params.pad: block res: param 'pad' is used by none of its rows (write {pad} where its value goes, "
      "or remove it)"]),
    ([("    skip: add\n", "")],
     ["blocks.res.shortcut: block res: a shortcut is what `skip: add` adds where the input's shape differs from the "
      "rows' output; this block has no skip"]),
    ([('    shortcut: ["conv {ch} 1x1 /{stride}"]\n', '')],
     ["networks.net.layers[2]: block res: its rows turn the 8x8x8 input into 16x4x4, so `skip: add` cannot add the "
      "input itself; give the block a shortcut, rows that bring its input to 16x4x4 (e.g. shortcut: [conv {ch} 1x1])"]),
    ([('["conv {ch} 1x1 /{stride}"]', '["conv {ch} 1x1"]')],
     ["networks.net.layers[2]: block res: its shortcut turns the 8x8x8 input into 16x8x8 but its rows give 16x4x4; "
      "`skip: add` needs the two equal"]),
    ([('"conv {ch} 3x3"]', '"conv {ch} 3x3, frozen"]')],
     ["networks.net.layers[1]: in block res, blocks.res.layers[1] 'conv 8 3x3, frozen': a block's own rows are never "
      "frozen one by one: freeze the row that uses the block ('block NAME ..., frozen')",
      "networks.net.layers[2]: in block res, blocks.res.layers[1] 'conv 16 3x3, frozen': a block's own rows are never "
      "frozen one by one: freeze the row that uses the block ('block NAME ..., frozen')"]),
    ([('"conv {ch} 3x3 /{stride}, relu"', '"conv {ch} 9x9 /{stride} valid, relu"')],
     ["networks.net.layers[1]: in block res, layers[0] 'conv 8 9x9 valid, relu': a 9x9 conv does not fit a 8x8x8 input"]),
])
def test_block_problems_are_located_and_say_what_is_wrong(replacements, expected):
    assert problems(spec_with(*replacements)) == expected


def test_a_block_that_uses_itself_is_refused():
    text = spec_with(("blocks:\n", """blocks:
  a:
    layers: [relu, block b]
  b:
    layers: [block a]
"""), ('"block res ch=8", ', '"block a", '))
    assert problems(text) == ["networks.net.layers[1]: in block a, blocks.a.layers[1] 'block b': in block b, "
                              "blocks.b.layers[0] 'block a': block a uses itself: a -> b -> a"]


@pytest.mark.parametrize("layers, expected", [
    ('["conv 8 3x3  as h", "conv 4 3x3", add h]',
     "networks.net.layers[2]: add h: cannot add the 8x8x8 output of row 'h' to a 4x8x8 tensor; an add needs the two "
     "shapes equal"),
    ('["conv 8 3x3", add g, "conv 4 3x3  as g"]',
     "networks.net.layers[1]: add g: row 2 (as g) comes after this one; a skip reads the output of an earlier row"),
    ('["conv 8 3x3  as h", add hh]',
     "networks.net.layers[1]: add hh: no earlier row is tapped 'hh' (write '... as hh' on the row whose output it adds); "
     "taps of earlier rows: h"),
    ('["conv 8 3x3  as h", concat hh]',
     "networks.net.layers[1]: concat hh: not a condition input of this network; its conditions: none declared "
     "(add `condition: {NAME: SHAPE}`); nor the tap of an earlier row (h)"),
    ('["conv 8 3x3", add h  as h]',
     "networks.net.layers[1]: add h: 'h' is this row's own tap; a skip reads the output of an earlier row"),
])
def test_skip_problems_are_located(layers, expected):
    text = spec_with(('["conv 8 3x3, relu", "block res ch=8", "block res ch=16 stride=2, relu", flatten, fc 64, reshape 1 8 8, sigmoid]',
                      layers))
    assert problems(text) == [expected]


# ---------------------------------------------------------------- the compiled modules

def _net(text: str = SPEC, name: str = "net"):
    spec = check(text)
    torch.manual_seed(0)
    return spec, build_network(spec.networks[name])


def test_a_residual_block_computes_its_input_plus_its_rows_by_hand():
    spec, module = _net()
    block = module.rows[1]
    assert isinstance(block, Block) and block.shortcut is None
    first, second = block.body[0][0], block.body[1]  # conv + relu, then conv
    x = torch.randn(3, 8, 8, 8)
    by_hand = x + F_conv(second, torch.relu(F_conv(first, x)))
    assert torch.allclose(block(x), by_hand, atol=1e-6)
    # the modules hold exactly the parameters shape inference counted, under readable keys
    assert sum(p.numel() for p in module.parameters()) == spec.networks["net"].info.trainable
    keys = set(module.state_dict())
    assert {"rows.1.body.0.0.weight", "rows.1.body.1.weight", "rows.2.shortcut.0.weight"} <= keys


def F_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


def test_the_shortcut_runs_where_the_channels_change():
    _, module = _net()
    block = module.rows[2]
    assert isinstance(block.shortcut, nn.ModuleList) and len(block.shortcut) == 1
    x = torch.randn(2, 8, 8, 8)
    body = F_conv(block.body[1], torch.relu(F_conv(block.body[0][0], x)))
    expected = torch.relu(body + F_conv(block.shortcut[0], x))  # the row's own relu closes it
    assert torch.allclose(block(x), expected, atol=1e-6)
    assert tuple(block(x).shape) == (2, 16, 4, 4)


def test_an_add_skip_carries_the_gradient_to_the_earlier_rows():
    text = spec_with(('["conv 8 3x3, relu", "block res ch=8", "block res ch=16 stride=2, relu", flatten, fc 64, reshape 1 8 8, sigmoid]',
                      '[flatten, "fc 16  as h", fc 16, add h, fc 64, reshape 1 8 8]'))
    spec, module = _net(text)
    with torch.no_grad():  # the row between the tap and the add passes nothing: only the skip carries a gradient
        module.rows[2].linear.weight.zero_()
        module.rows[2].linear.bias.zero_()
    x = torch.randn(4, 1, 8, 8)
    module(x).sum().backward()
    first = module.rows[1].linear
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    # and the value is the tapped output added: fc64(h + fc16(h)) with fc16 = 0 is fc64(h)
    with torch.no_grad():
        h = first(x.flatten(1))
        assert torch.allclose(module(x), module.rows[4](h).reshape(4, 1, 8, 8), atol=1e-6)


def test_a_concat_of_a_tap_joins_the_earlier_output_along_the_channels():
    text = spec_with(('["conv 8 3x3, relu", "block res ch=8", "block res ch=16 stride=2, relu", flatten, fc 64, reshape 1 8 8, sigmoid]',
                      '["conv 4 3x3  as h", "conv 2 3x3", concat h, "conv 1 1x1"]'))
    spec, module = _net(text)
    assert spec.networks["net"].info.rows[2].out_shape == (6, 8, 8)
    x = torch.randn(2, 1, 8, 8)
    h = module.rows[0](x)
    joined = torch.cat([module.rows[1](h), h], dim=1)
    assert torch.allclose(module(x), module.rows[3](joined), atol=1e-6)


def test_spectral_norm_init_and_freezing_reach_the_rows_inside_blocks():
    text = spec_with(("    input: x\n", "    input: x\n    spectral_norm: true\n    init: normal(0, 0.02)\n"),
                     ('"block res ch=16 stride=2, relu"', '"block res ch=16 stride=2, relu, frozen"'))
    spec, module = _net(text)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and all(parametrize.is_parametrized(m, "weight") for m in convs)
    original = [m.parametrizations.weight.original for m in convs]
    assert all(abs(w.std().item() - 0.02) < 0.01 for w in original)  # the init, before the normalisation
    assert all(not p.requires_grad for p in module.rows[2].parameters())
    assert all(p.requires_grad for p in module.rows[1].parameters())
    info = spec.networks["net"].info
    assert info.frozen == info.rows[2].params and all(r.frozen for r in info.rows[2].walk())
    assert sum(p.numel() for p in module.parameters() if not p.requires_grad) == info.frozen
    assert info.rows[1].row["sn"] and all(r.row.get("sn") for r in info.rows[1].layers)


def test_a_block_that_ends_in_a_sigmoid_gives_its_logits():
    text = spec_with(('fc 64, reshape 1 8 8, sigmoid]', 'fc 64, reshape 1 8 8, "block res ch=1, sigmoid"]'))
    spec, module = _net(text)
    assert spec.networks["net"].info.ends_in_sigmoid
    module.eval()
    out = module.forward_taps(torch.randn(2, 1, 8, 8))
    assert torch.allclose(out[None], torch.sigmoid(out["(logits)"]))


# ---------------------------------------------------------------- show, diff and the zoo spec

def test_show_lists_each_block_with_its_shape_count_and_rows():
    rc, out, err = cli_in_process("show", RESNET_GAN)
    assert rc == 0, err
    lines = out.splitlines()
    up = next(line for line in lines if "block up ch=64  (skip add)" in line)
    assert up.split()[0] == "1" and "64x4x4" in up and "78,272" in up
    assert any(line.split()[:2] == ["1.3", "conv"] and "37,056" in line for line in lines)
    assert any(line.split()[:3] == ["1.s1", "shortcut:", "conv"] and "4,160" in line for line in lines)
    rc, out, _ = cli_in_process("show", RESNET_GAN, "--json")
    shown = json.loads(out)["networks"]["gen"]["rows"][1]
    assert shown["skip"] == "add" and [r["row"] for r in shown["shortcut"]] == ["upsample 2", "conv 64 1x1"]
    assert shown["params"] == sum(r["params"] for r in shown["layers"] + shown["shortcut"])


def test_diff_names_a_changed_block_argument():
    a = genspec.load(RESNET_GAN)
    b = genspec.load(RESNET_GAN, ["networks.gen.layers[2]=block up ch=32"])
    result = diff_specs(a, b)
    rows = result["networks"]["gen"]["rows"]
    changed = [r for r in rows if r["op"] == "changed"]
    assert [r["index_a"] for r in changed] == [2]  # the bn after it has other counts, but is the same row
    assert changed[0]["cells"]["args"] == [{"ch": 64}, {"ch": 32}]
    assert changed[0]["cells"]["layers"][1][3] == "conv 32 3x3, bn, relu"
    assert "block up ch=64" in render_text(result)


def test_the_resnet_gan_zoo_spec_trains_and_generates_digit_sized_images(tmp_path):
    rc, _, err = cli_in_process("run", RESNET_GAN, "--out", tmp_path / "run", "--no-progress",
                                "--set", "train.epochs=2", "--set", "data.split={train: 128, test: 32}",
                                "--set", "train.batch_size=32", "--set", "train.device=cpu")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "objective/gen" in metrics["train_last_epoch"]  # 8 steps: five critic updates, then the generator's
    run = genspec.load_run(tmp_path / "run")
    gen = run.networks["gen"].eval()
    with torch.no_grad():
        images = gen(torch.randn(5, 128))
    assert tuple(images.shape) == (5, 1, 8, 8) and images.abs().max() <= 1
    assert isinstance(gen.rows[1], Block) and isinstance(run.networks["dis"].rows[2], Block)
    assert run.networks["dis"].rows[2].shortcut is None  # the size-keeping block adds its input as it is


def test_a_tap_on_a_block_row_reads_the_block_s_output():
    spec, module = _net(spec_with(('"block res ch=8", ', '"block res ch=8  as mid", ')))
    assert spec.networks["net"].info.taps == {"mid": 1}
    module.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(module.forward_taps(x)["mid"], module.rows[1](module.rows[0](x)))
