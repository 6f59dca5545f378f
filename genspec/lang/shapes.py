"""Shape inference and parameter counts for layer tables, in plain Python (no torch).

`genspec validate` and `show` use this, so a shape error or a parameter count never needs
torch; tests check that the compiled nn.Modules agree with it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from genspec.lang import plugins
from genspec.lang.rows import format_row


class ShapeError(ValueError):
    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


@dataclass
class RowInfo:
    index: int
    row: dict  # canonical mapping
    in_shape: tuple
    out_shape: tuple
    params: int
    frozen: bool
    source: int | None = None  # add, or concat of a tap: the index of the earlier row whose output it reads
    layers: list["RowInfo"] = field(default_factory=list)  # a block's rows
    shortcut: list["RowInfo"] = field(default_factory=list)  # a block's shortcut rows, where its shapes need them

    def walk(self):
        """This row, then every row inside it (a block's rows and shortcut, nested blocks too)."""
        yield self
        for inner in self.layers + self.shortcut:
            yield from inner.walk()


@dataclass
class NetworkInfo:
    input: tuple
    rows: list[RowInfo]
    output: tuple
    kind: str  # "tensor", or "dist" for a network that ends in a gaussian head
    taps: dict[str, int] = field(default_factory=dict)  # tap name -> row index
    conditions: dict[str, tuple] = field(default_factory=dict)  # extra inputs, in call order -> shape

    @property
    def ends_in_sigmoid(self) -> bool:
        """Whether the output is a sigmoid of the last row's pre-activation (nothing after it):
        a cross-entropy of it is then computed from those logits, which never saturate."""
        last = self.rows[-1].row if self.rows else {}
        return last.get("op") == "sigmoid" or (last.get("act") == "sigmoid" and not last.get("dropout"))

    def walk(self):
        """Every row, a block's own rows after the block's row."""
        for r in self.rows:
            yield from r.walk()

    @property
    def trainable(self) -> int:
        return sum(r.params for r in self.rows if not r.frozen)

    @property
    def frozen(self) -> int:
        return sum(r.params for r in self.rows if r.frozen)


def conv_padding(row: dict, height: int, width: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of a conv row.

    'same' (the default) gives ceil(size / stride), as TensorFlow's 'same' does: symmetric for odd
    kernels, one extra pixel right and bottom where an even kernel needs it; 'valid' is none.
    """
    padding = row.get("padding", "same")
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding != "same":
        p = int(padding)
        return (p, p, p, p)
    k, s = row["kernel"], row["stride"]
    total_h = max((math.ceil(height / s) - 1) * s + k - height, 0)
    total_w = max((math.ceil(width / s) - 1) * s + k - width, 0)
    if k % 2:  # odd kernels: PyTorch's symmetric padding gives the same size
        return ((k - 1) // 2,) * 4
    return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)


def deconv_padding(row: dict, index: int = 0) -> tuple[int, int]:
    """(padding, output_padding) of a transposed conv; 'same' multiplies the size by the stride."""
    k, s = row["kernel"], row["stride"]
    padding = row.get("padding", "same")
    if padding == "valid":
        return 0, 0
    if padding != "same":
        return int(padding), 0
    p = max(0, math.ceil((k - s) / 2))
    extra = s + 2 * p - k
    if not 0 <= extra < s:
        raise ShapeError(index, f"a {k}x{k} transposed conv cannot scale by exactly x{s}; give 'pad N' explicitly")
    return p, extra


def infer_network(input_shape: tuple, rows: list[dict], freeze=False, conditions: dict | None = None) -> NetworkInfo:
    """Run shape inference over canonical rows. Raises ShapeError naming the row index.

    `conditions` maps the names of extra inputs (a CGAN's one-hot label) to their shapes; a
    `concat NAME` row joins one to the running tensor."""
    conditions = conditions or {}
    infos, taps, shape, kind = _infer_rows(rows, tuple(input_shape), conditions, freeze is True)
    if freeze == "all_but_last":
        with_params = [r for r in infos if r.params]
        for r in with_params[:-1]:
            r.frozen = True
    for r in infos:  # a frozen block freezes every row inside it
        for inner in r.walk():
            inner.frozen = inner.frozen or r.frozen
    return NetworkInfo(tuple(input_shape), infos, shape, kind, taps, dict(conditions))


def _infer_rows(rows: list[dict], shape: tuple, conditions: dict | None, frozen: bool) -> tuple[list[RowInfo], dict, tuple, str]:
    """A table's (or a block's) rows from an input shape: (row infos, taps, output shape, kind)."""
    infos: list[RowInfo] = []
    taps: dict[str, int] = {}
    named = {r["name"]: i for i, r in enumerate(rows) if r.get("name")}
    kind = "tensor"
    for i, row in enumerate(rows):
        if kind == "dist":
            raise ShapeError(i, "rows after a gaussian head: the head must be the last row")
        source, layers, shortcut = None, [], []
        if row["op"] in ("add", "concat"):
            source = _skip_source(i, row, taps, named, conditions)
        if row["op"] == "add":
            out, params = _add_shape(i, shape, row["input"], infos[source].out_shape), 0
        elif row["op"] == "concat":
            extra = conditions[row["input"]] if source is None else infos[source].out_shape
            out, params = concat_shape(i, shape, row["input"], extra, "condition" if source is None else "tap"), 0
        elif row["op"] == "block":
            out, params, layers, shortcut = _block_shape(i, row, shape)
        else:
            out, params = _row_shape(i, row, shape)
        if row.get("norm"):
            params += _norm_params(row["norm"], out, i)
        infos.append(RowInfo(i, row, shape, out, params, bool(row.get("frozen")) or frozen, source, layers, shortcut))
        if row["op"] == "gaussian":
            kind = "dist"
        if row.get("name"):
            if row["name"] in taps:
                raise ShapeError(i, f"tap name {row['name']!r} used twice")
            taps[row["name"]] = i
        shape = out
    return infos, taps, shape, kind


def _skip_source(i: int, row: dict, taps: dict, named: dict, conditions: dict | None) -> int | None:
    """The earlier row an add (or a concat of a tap) reads; None for a concat of a condition input."""
    name, op = row["input"], row["op"]
    if op == "concat" and conditions and name in conditions:
        if name in taps:
            raise ShapeError(i, f"concat {name}: both a condition input and the tap of row {taps[name]}; rename one")
        return None
    if name in taps:
        return taps[name]
    if named.get(name) == i:
        raise ShapeError(i, f"{op} {name}: {name!r} is this row's own tap; a skip reads the output of an earlier row")
    if name in named:
        raise ShapeError(i, f"{op} {name}: row {named[name]} (as {name}) comes after this one; "
                            f"a skip reads the output of an earlier row")
    earlier = f"; taps of earlier rows: {', '.join(taps)}" if taps else ""
    if op == "add":
        raise ShapeError(i, f"add {name}: no earlier row is tapped {name!r} (write '... as {name}' on the row whose "
                            f"output it adds){earlier}")
    if conditions is None:  # inside a block: its own rows' taps only
        raise ShapeError(i, f"concat {name}: no earlier row of the block is tapped {name!r}{earlier}")
    known = ", ".join(conditions) if conditions else "none declared (add `condition: {NAME: SHAPE}`)"
    raise ShapeError(i, f"concat {name}: not a condition input of this network; its conditions: {known}"
                        + (f"; nor the tap of an earlier row ({', '.join(taps)})" if taps else ""))


def _add_shape(i: int, shape: tuple, name: str, earlier: tuple) -> tuple:
    if tuple(earlier) != tuple(shape):
        raise ShapeError(i, f"add {name}: cannot add the {fmt(earlier)} output of row {name!r} to a {fmt(shape)} tensor; "
                            "an add needs the two shapes equal")
    return shape


def _block_shape(i: int, row: dict, shape: tuple) -> tuple[tuple, int, list, list]:
    """A block row: (output shape, parameters, its rows' infos, its shortcut's infos)."""
    name = f"block {row['block']}"
    layers, out = _inside(i, row, "layers", shape)
    shortcut: list[RowInfo] = []
    if row.get("skip") == "add" and out != shape:
        if not row.get("shortcut"):
            raise ShapeError(i, f"{name}: its rows turn the {fmt(shape)} input into {fmt(out)}, so `skip: add` cannot add "
                                f"the input itself; give the block a shortcut, rows that bring its input to {fmt(out)} "
                                "(e.g. shortcut: [conv {ch} 1x1])")
        shortcut, short_out = _inside(i, row, "shortcut", shape)
        if short_out != out:
            raise ShapeError(i, f"{name}: its shortcut turns the {fmt(shape)} input into {fmt(short_out)} but its rows give "
                                f"{fmt(out)}; `skip: add` needs the two equal")
    elif row.get("skip") == "concat":
        if not (len(shape) == len(out) == 1 or (len(shape) == len(out) == 3 and shape[1:] == out[1:])):
            raise ShapeError(i, f"{name}: `skip: concat` joins the {fmt(shape)} input and the rows' {fmt(out)} output "
                                "along the channels, which needs both flat or both of the same height and width")
        out = (shape[0] + out[0], *out[1:])
    return out, sum(r.params for r in layers + shortcut), layers, shortcut


def _inside(i: int, row: dict, key: str, shape: tuple) -> tuple[list[RowInfo], tuple]:
    """Shape inference of a block's rows (or shortcut), its errors located at the block's row."""
    try:
        infos, _, out, _ = _infer_rows(row[key], shape, None, False)  # no condition inputs inside a block
    except ShapeError as exc:
        inner = row[key][exc.index]
        raise ShapeError(i, f"in block {row['block']}, {key}[{exc.index}] '{format_row(inner)}': {exc}") from None
    return infos, out


def concat_shape(i: int, shape: tuple, name: str, extra: tuple, what: str = "condition") -> tuple:
    """A flat condition (or tap) joins a flat tensor end to end, or an image as constant feature
    maps (one channel per value, as conditional GANs feed labels to a convolutional discriminator);
    an image of the same height and width joins along the channels."""
    extra = tuple(extra)
    if len(shape) == 1 and len(extra) == 1:
        return (shape[0] + extra[0],)
    if len(shape) == 3 and len(extra) == 1:
        return (shape[0] + extra[0], shape[1], shape[2])
    if len(shape) == 3 and len(extra) == 3 and extra[1:] == shape[1:]:
        return (shape[0] + extra[0], shape[1], shape[2])
    raise ShapeError(i, f"concat {name}: cannot join a {fmt(extra)} {what} to a {fmt(shape)} tensor")

def _row_shape(i: int, row: dict, shape: tuple) -> tuple[tuple, int]:
    op = row["op"]
    if op in plugins.LAYERS:
        return _plugin_row_shape(i, plugins.LAYERS[op], row, shape)
    bias = row.get("bias", True)
    if op in ("conv", "deconv", "maxpool", "avgpool", "upsample", "crop") and len(shape) != 3:
        raise ShapeError(i, f"{op} needs a CxHxW input, got {fmt(shape)}")
    if op == "conv" or (op == "gaussian" and "kernel" in row):
        if len(shape) != 3:
            raise ShapeError(i, f"a convolutional gaussian head needs a CxHxW input, got {fmt(shape)}")
        c, h, w = shape
        k, s = row["kernel"], row["stride"]
        left, right, top, bottom = conv_padding(row, h, w)
        oh, ow = (h + top + bottom - k) // s + 1, (w + left + right - k) // s + 1
        if oh < 1 or ow < 1:
            raise ShapeError(i, f"a {k}x{k} conv does not fit a {fmt(shape)} input")
        channels = row["out"] * (2 if op == "gaussian" and "var" not in row else 1)  # mean and log-variance
        return (row["out"], oh, ow), channels * c * k * k + (channels if bias else 0)
    if op == "deconv":
        c, h, w = shape
        k, s = row["kernel"], row["stride"]
        p, extra = deconv_padding(row, i)
        oh, ow = (h - 1) * s - 2 * p + k + extra, (w - 1) * s - 2 * p + k + extra
        if oh < 1 or ow < 1:
            raise ShapeError(i, f"padding too large for a {fmt(shape)} input")
        return (row["out"], oh, ow), c * row["out"] * k * k + (row["out"] if bias else 0)
    if op in ("fc", "gaussian"):
        n_in = math.prod(shape)
        out = row["out"]
        out_shape = (out,) if isinstance(out, int) else tuple(out)
        n_out = math.prod(out_shape) * (2 if op == "gaussian" and "var" not in row else 1)
        return out_shape, n_in * n_out + (n_out if bias else 0)
    if op in ("maxpool", "avgpool"):
        c, h, w = shape
        k, s = row["kernel"], row["stride"]
        if h < k or w < k:
            raise ShapeError(i, f"a {k}x{k} pool does not fit a {fmt(shape)} input")
        return (c, (h - k) // s + 1, (w - k) // s + 1), 0
    if op == "upsample":
        c, h, w = shape
        return (c, h * row["scale"], w * row["scale"]), 0
    if op == "crop":
        c, h, w = shape
        p = row["p"]
        if h <= 2 * p or w <= 2 * p:
            raise ShapeError(i, f"cropping {p} from each border of {fmt(shape)} leaves nothing")
        return (c, h - 2 * p, w - 2 * p), 0
    if op == "flatten":
        return (math.prod(shape),), 0
    if op == "reshape":
        target = tuple(row["shape"])
        if math.prod(target) != math.prod(shape):
            raise ShapeError(i, f"cannot reshape {fmt(shape)} ({math.prod(shape)} values) to {fmt(target)} ({math.prod(target)})")
        return target, 0
    if op in ("bn", "ln", "vbn"):
        return shape, _norm_params(op, shape, i)
    return shape, 0  # activations, dropout, identity


def _plugin_row_shape(i: int, layer, row: dict, shape: tuple) -> tuple[tuple, int]:
    """A plugin layer's output shape and parameters, from its own functions; the ValueError it
    raises for an input it does not fit is this row's problem."""
    try:
        out = layer.shape(row, tuple(shape))
        out = tuple(out) if isinstance(out, (tuple, list)) else out
        if not (isinstance(out, tuple) and out and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in out)):
            raise ShapeError(i, f"{row['op']} (plugin {layer.module}): its shape function gave {out!r}, "
                                "not a tuple of positive sizes")
        return out, layer.count(row, tuple(shape), out)
    except ValueError as exc:
        if isinstance(exc, ShapeError):
            raise
        raise ShapeError(i, f"{row['op']}: {exc}") from None


def _norm_params(norm: str, shape: tuple, i: int) -> int:
    if norm in ("bn", "vbn"):
        if len(shape) not in (1, 3):
            raise ShapeError(i, f"batch norm needs a flat or CxHxW input, got {fmt(shape)}")
        return 2 * shape[0]
    return 2 * math.prod(shape)  # layer norm over every non-batch dim


def fmt(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def prior_parameters(latent) -> int:
    """Trainable parameters of a latent's prior (a RealNVP flow: two 3-layer nets per flow; a
    codebook: its code vectors; a plugin's: what it counts)."""
    if latent.prior == "codebook":
        return int(latent.prior_args[0]) * latent.shape[0] if latent.prior_args and latent.shape else 0
    if latent.prior in plugins.PRIORS:
        count = plugins.PRIORS[latent.prior].parameters
        return int(count(latent)) if count else 0
    if latent.prior != "realnvp":
        return 0
    dim, hidden = math.prod(latent.shape), latent.prior_kwargs.get("hidden", 64)
    total, first = 0, dim // 2
    for _ in range(latent.prior_kwargs.get("flows", 2)):
        second = dim - first
        net = first * hidden + hidden + hidden * hidden + hidden + hidden * second + second
        total += 2 * net  # scale and shift
        first = second  # the halves swap between flows
    return total
