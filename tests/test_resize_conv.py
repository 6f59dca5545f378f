"""A nearest `upsample s` row followed by a stride-1 `conv` row (a resize-convolution) runs as one
transposed convolution (layers.ResizeConv2d): the same function and gradients as the two rows run
as written, the same parameters and state-dict keys, and no fusion where the upsample's output is
read (a tap, an `add` or `concat` of it) or the pair is not one the identity holds for."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from genspec.compiler.layers import ResizeConv2d, build_network
from spec_helpers import check

CASES = [  # (scale, kernel, padding, in channels, out channels, input size)
    (4, (5, 5), (2, 2), 16, 1, (7, 7)),   # seed 004's reading: 7x7 -> 28x28, one 5x5 conv
    (2, (3, 3), (1, 1), 8, 6, (4, 5)),    # the usual upsample 2 + 3x3 of a ResNet generator
    (2, (1, 1), (0, 0), 4, 3, (3, 3)),    # a 1x1 shortcut
    (3, (5, 3), (1, 0), 5, 2, (4, 6)),    # rectangular kernel, less than 'same' padding
    (2, (4, 4), (3, 3), 3, 2, (5, 5)),    # even kernel, the most padding the identity allows
]


@pytest.mark.parametrize("scale, kernel, padding, c_in, c_out, size", CASES)
def test_the_fused_form_computes_the_upsample_then_the_conv(scale, kernel, padding, c_in, c_out, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, padding=padding).double()
    x = torch.randn(3, c_in, *size, dtype=torch.float64, requires_grad=True)
    written = conv(F.interpolate(x, scale_factor=scale, mode="nearest"))
    grads_written = torch.autograd.grad(written.square().sum(), (x, conv.weight, conv.bias))

    fused = ResizeConv2d(conv, scale)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    out = fused(x)
    grads_fused = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
    assert out.shape == written.shape
    torch.testing.assert_close(out, written, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_fused, grads_written):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_bias_free_conv_fuses_too():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ResizeConv2d(conv, 2)(x), conv(F.interpolate(x, scale_factor=2)), rtol=1e-5, atol=1e-5)


GEN = """\
genspec: 1
name: resize
data: {{dataset: digits, split: {{train: 32, test: 16}}}}
latent: {{z: {{shape: [8], prior: normal}}}}
networks:
  gen:
    input: z
    layers: [fc 4x4x6, relu, {rows}]
graph: {{x_fake: gen(sample(z))}}
losses: {{l: "mean(x_fake)"}}
objectives: {{gen: {{minimize: l, optimizer: adam(1e-3)}}}}
train: {{epochs: 1, batch_size: 16, device: cpu}}
"""


def _gen(rows: str):
    spec = check(GEN.format(rows=rows))
    torch.manual_seed(0)
    return build_network(spec.networks["gen"])


def _as_written(net) -> nn.Module:
    """The network with every fused pair put back as the upsample and conv rows it stands for."""
    rows = net.rows
    for i in range(1, len(rows)):
        seq = rows[i] if isinstance(rows[i], nn.Sequential) else None
        fused = seq[0] if seq is not None else rows[i]
        if isinstance(fused, ResizeConv2d):
            plain = nn.Conv2d(fused.in_channels, fused.out_channels, fused.kernel_size, padding=fused.padding,
                              bias=fused.bias is not None)
            plain.weight, plain.bias = fused.weight, fused.bias
            if seq is not None:
                seq[0] = plain
            else:
                rows[i] = plain
            rows[i - 1] = nn.Upsample(scale_factor=fused.scale, mode="nearest")
    return net


def test_a_table_s_upsample_and_conv_rows_run_fused_with_the_same_outputs_and_keys():
    net = _gen('upsample 2, "conv 4 3x3, bn, relu", upsample 2, "conv 1 5x5, sigmoid"')
    fused = [m for m in net.modules() if isinstance(m, ResizeConv2d)]
    assert [m.scale for m in fused] == [2, 2]
    assert not any(isinstance(m, nn.Upsample) for m in net.modules())
    keys = set(net.state_dict())
    z = torch.randn(5, 8)
    net.eval()
    with torch.no_grad():
        out = net(z)
        reference = _as_written(net)(z)
    assert out.shape == (5, 1, 16, 16)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert set(net.state_dict()) == keys  # a checkpoint of either loads into the other


def test_no_fusion_where_the_upsample_s_output_is_read_or_the_pair_does_not_allow_it():
    assert not _fused(_gen('"upsample 2  as up", "conv 4 3x3", concat up, "conv 1 3x3, sigmoid"'))  # read later
    assert not _fused(_gen('"upsample 2, relu", "conv 1 3x3, sigmoid"'))      # something after the upsample
    assert not _fused(_gen('"upsample 2 bilinear", "conv 1 3x3, sigmoid"'))   # not nearest
    assert not _fused(_gen('upsample 2, "conv 1 3x3 /2, sigmoid"'))          # a strided conv
    assert not _fused(_gen('upsample 2, "conv 1 4x4, sigmoid"'))             # even 'same': padded apart
    assert _fused(_gen('upsample 2, "conv 1 3x3, sigmoid"'))


def _fused(net) -> bool:
    return any(isinstance(m, ResizeConv2d) for m in net.modules())


def test_a_spectrally_normalised_conv_stays_fused_and_normalised():
    net = _gen('upsample 2, "conv 1 3x3, sn, sigmoid"')
    fused = next(m for m in net.modules() if isinstance(m, ResizeConv2d))
    assert torch.nn.utils.parametrize.is_parametrized(fused, "weight")
    with torch.no_grad():
        for _ in range(30):  # let the power iteration settle
            net(torch.randn(4, 8))
        sigma = torch.linalg.matrix_norm(fused.weight.flatten(1), ord=2)
    assert abs(sigma.item() - 1) < 1e-2


def test_fusing_draws_nothing_from_the_random_stream():
    """The rows after a fused pair initialise as they would unfused (runs stay comparable)."""
    conv = nn.Conv2d(4, 2, 3, padding=1)
    torch.manual_seed(3)
    ResizeConv2d(conv, 2)
    after_fusing = torch.rand(3)
    torch.manual_seed(3)
    torch.testing.assert_close(after_fusing, torch.rand(3), rtol=0, atol=0)


def test_a_reader_of_the_upsample_row_by_index_still_gets_its_output():
    """A classifier's feature row, read by index (fidelity, balancing), may be a fused upsample."""
    net = _gen('upsample 2, "conv 1 3x3, sigmoid"').eval()
    assert net.rows.deferred == {2: 2}
    with torch.no_grad():
        h, kept, outputs = torch.randn(3, 8), {}, []
        for i in range(len(net.rows)):
            h = net.rows.step(i, h, kept)
            outputs.append(net.rows.output_of(i, h))
    assert outputs[2].shape == (3, 6, 8, 8)
    torch.testing.assert_close(outputs[2], F.interpolate(outputs[1], scale_factor=2))
    assert net.rows.output_of(1, outputs[1]) is outputs[1]
