"""Layer tables to nn.Modules: one `TableNet` per network, one small module per row (a `Block`
for a block row, its rows its children)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from genspec.errors import RunError
from genspec.lang import plugins
from genspec.lang.shapes import RowInfo, conv_padding, deconv_padding
from genspec.lang.spec import Network


def full_precision(t: torch.Tensor) -> torch.dtype:
    """t's dtype, at least float32: what noise, targets and constants beside a network output take.
    Under bfloat16 autocast the outputs are bfloat16, whose 8-bit mantissa would round 0.9 to
    0.8984 and quantise noise draws; float32 and float64 stay as they are."""
    return torch.promote_types(t.dtype, torch.float32)


@dataclass
class Gaussian:
    """A diagonal Gaussian from a `gaussian` head (log-variance fixed for `var=`)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def rsample(self, k: int | None = None) -> torch.Tensor:
        """One draw per example, or with k: k draws per example on a new leading axis (k, batch, ...)."""
        if k is None:
            return self.mean + torch.exp(0.5 * self.logvar) * torch.randn_like(self.mean, dtype=full_precision(self.mean))
        noise = torch.randn((k, *self.mean.shape), device=self.mean.device, dtype=full_precision(self.mean))
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def log_prob(self, value: torch.Tensor, event_dims: int) -> torch.Tensor:
        """log N(value; mean, exp(logvar)), summed over the last `event_dims` dimensions (one
        number per example; a value with a sample axis broadcasts against the batch)."""
        log_density = -0.5 * ((value - self.mean) ** 2 / self.logvar.exp() + self.logvar + _LOG_2PI)
        return sum_last(log_density, event_dims)

    def detach(self) -> "Gaussian":
        return Gaussian(self.mean.detach(), self.logvar.detach())

    def unfold(self, k: int) -> "Gaussian":
        return Gaussian(unfold_samples(self.mean, k), unfold_samples(self.logvar, k))


_LOG_2PI = math.log(2 * math.pi)


def sum_last(t: torch.Tensor, dims: int, reduce: str = "sum") -> torch.Tensor:
    """Sum (or `reduce`: mean) over the last `dims` dimensions: each example's (or each draw's)
    values to one number."""
    return getattr(t.flatten(t.dim() - dims), reduce)(-1) if dims else t


def unfold_samples(t: torch.Tensor, k: int) -> torch.Tensor:
    """(k * batch, ...) back to (k, batch, ...): a network ran k draws per example as examples."""
    return t.reshape(k, t.shape[0] // k, *t.shape[1:])


class GaussianHead(nn.Module):
    def __init__(self, n_in: int, out_shape: tuple, var: float | None, bias: bool = True):
        super().__init__()
        self.out_shape = tuple(out_shape)
        n = math.prod(out_shape)
        self.fixed_logvar = None if var is None else math.log(var)
        self.linear = nn.Linear(n_in, n if var is not None else 2 * n, bias=bias)

    def forward(self, x: torch.Tensor) -> Gaussian:
        h = self.linear(x.flatten(1))
        if self.fixed_logvar is not None:
            mean = h.view(-1, *self.out_shape)
            return Gaussian(mean, torch.full_like(mean, self.fixed_logvar, dtype=full_precision(mean)))
        mean, logvar = h.chunk(2, dim=1)
        return Gaussian(mean.reshape(-1, *self.out_shape), logvar.reshape(-1, *self.out_shape))


class ConvGaussianHead(nn.Module):
    """A convolutional gaussian head: 2C channels split into mean and log-variance (C with `var=`)."""

    def __init__(self, conv: nn.Module, var: float | None):
        super().__init__()
        self.conv = conv
        self.fixed_logvar = None if var is None else math.log(var)

    def forward(self, x: torch.Tensor) -> Gaussian:
        h = self.conv(x)
        if self.fixed_logvar is not None:
            return Gaussian(h, torch.full_like(h, self.fixed_logvar, dtype=full_precision(h)))
        mean, logvar = h.chunk(2, dim=1)
        return Gaussian(mean, logvar)


class Reshape(nn.Module):
    def __init__(self, shape: tuple):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return "x".join(map(str, self.shape))


class Crop(nn.Module):
    def __init__(self, p: int):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x[..., self.p:-self.p, self.p:-self.p]


class Concat(nn.Module):
    """Joins a condition input (or an earlier row's output) to the running tensor: end to end for
    flat tensors, as constant feature maps (broadcast over height and width) or channels for images."""

    def __init__(self, post: list[nn.Module] = ()):
        super().__init__()
        self.post = nn.Sequential(*post)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and condition.dim() == 2:
            condition = condition[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return self.post(torch.cat([x, condition.to(x.dtype)], dim=1))


class Add(nn.Module):
    """A skip connection: the running tensor plus the output of an earlier row (`add NAME`)."""

    def __init__(self, post: list[nn.Module] = ()):
        super().__init__()
        self.post = nn.Sequential(*post)

    def forward(self, x: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
        return self.post(x + earlier)


class Rows(nn.ModuleList):
    """A table's (or a block's) row modules, run in order: an `add` row, or a `concat` of a tap,
    reads the output of the earlier row it names; a `concat` of a condition reads that input."""

    def __init__(self, infos: list[RowInfo], conditions: list[str] = (), tapped: set = frozenset()):
        super().__init__(build_info(r) for r in infos)
        self.sources = {r.index: r.source for r in infos if r.source is not None}
        self.condition_at = {r.index: list(conditions).index(r.row["input"]) for r in infos
                             if r.row["op"] == "concat" and r.source is None}
        self.kept = set(self.sources.values())  # the rows whose outputs a later row reads
        self.deferred: dict[int, int] = {}  # upsample rows computed by the conv after them: index -> scale
        fuse_resize_convs(self, self.kept | set(tapped))

    def output_of(self, i: int, x):
        """Row i's output as the table writes it, from what step(i) gave: for an upsample row that
        the conv after it computes (fuse_resize_convs), the upsampled tensor, made here. For readers
        of a row by its index (a classifier's feature row)."""
        scale = self.deferred.get(i)
        return x if scale is None else F.interpolate(x, scale_factor=scale, mode="nearest")

    def step(self, i: int, x, kept: dict, conditions=()):
        """Row i on x; `kept` holds the outputs later rows read (this row's is added if so)."""
        row = self[i]
        if i in self.condition_at:
            x = row(x, conditions[self.condition_at[i]])
        elif i in self.sources:
            x = row(x, kept[self.sources[i]])
        else:
            x = row(x)
        if i in self.kept:
            kept[i] = x
        return x

    def forward(self, x):
        kept: dict = {}
        for i in range(len(self)):
            x = self.step(i, x, kept)
        return x


def resize_conv(h, weight, bias, scale, padding):
    """conv2d(F.interpolate(h, scale_factor=scale, mode="nearest"), weight, bias, padding=padding),
    computed as one transposed convolution of stride `scale`: the same function, without the
    scale*scale times larger upsampled tensor. Upsampling repeats each pixel over a scale x scale
    patch, so the kernel's taps that fall on one patch act on that pixel with the sum of their
    weights: the transposed kernel is a box sum of the weight, flipped. Needs padding <= kernel - 1."""
    out_c, in_c, kh, kw = weight.shape
    box = torch.ones(1, 1, scale, scale, dtype=weight.dtype, device=weight.device)
    sums = F.conv2d(weight.reshape(out_c * in_c, 1, kh, kw), box, padding=scale - 1)
    kernel = sums.flip(-2, -1).reshape(out_c, in_c, kh + scale - 1, kw + scale - 1).transpose(0, 1)
    return F.conv_transpose2d(h, kernel, bias, stride=scale, padding=(kh - 1 - padding[0], kw - 1 - padding[1]))


class ResizeConv2d(nn.Conv2d):
    """A nearest `upsample s` row and the stride-1 `conv` row after it, computed as one transposed
    convolution: the same function (up to float rounding), without the s*s times larger upsampled
    tensor. Its input is the upsample's input. On a 2-core CPU the pair `upsample 4; conv 1 5x5`
    of 128 channels at 7x7 took 1.28 s forward and backward for a batch of 256 (1 thread); this
    form, 0.061 s (benchmarks/resize_conv.py). The parameters are the conv's own (weight, bias; a
    spectral norm acts on that weight), so checkpoints and `genspec export --format python` see the
    convolution they name.
    resize_conv says why it is exact."""

    def __init__(self, conv: nn.Conv2d, scale: int):
        # built on the meta device, so that its own (discarded) initial weights draw nothing from
        # the random stream: the network's other rows initialise as they would unfused
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, 1, conv.padding,
                         bias=conv.bias is not None, device="meta")
        self.weight, self.bias, self.scale = conv.weight, conv.bias, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_conv(x, self.weight, self.bias, self.scale, self.padding)

    def extra_repr(self) -> str:
        return f"upsample {self.scale} (nearest) then " + super().extra_repr()


def _fusable_conv(module: nn.Module) -> nn.Conv2d | None:
    """The plain stride-1 convolution a row module starts with, if it can take in an upsample."""
    conv = module[0] if isinstance(module, nn.Sequential) and len(module) else module
    if type(conv) is not nn.Conv2d or isinstance(conv.padding, str):
        return None
    plain = conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
    return conv if plain and all(p <= k - 1 for k, p in zip(conv.kernel_size, conv.padding)) else None


def fuse_resize_convs(rows: "Rows", read: set) -> None:
    """Every nearest `upsample s` row (nothing after it in the row, its output read by no later row
    or tap) followed by a plain conv row: the conv becomes a ResizeConv2d of the upsample's input
    and the upsample row an Identity. Row indices and state-dict keys do not change."""
    for i in range(len(rows) - 1):
        up = rows[i]
        if type(up) is not nn.Upsample or up.mode != "nearest" or i in read or up.size is not None:
            continue
        scale = up.scale_factor
        if isinstance(scale, tuple) or float(scale) != int(scale) or int(scale) < 2:
            continue
        conv = _fusable_conv(rows[i + 1])
        if conv is None:
            continue
        fused = ResizeConv2d(conv, int(scale))
        if isinstance(rows[i + 1], nn.Sequential):
            rows[i + 1][0] = fused
        else:
            rows[i + 1] = fused
        rows[i] = nn.Identity()
        rows.deferred[i] = int(scale)


class Block(nn.Module):
    """A block row: its rows (`body`) in order; `skip: add` adds the block's input, or its
    `shortcut` of it where the shapes differ, and `skip: concat` joins the input and the rows'
    output along the channels; the row's own norm and activation then close it."""

    def __init__(self, info: RowInfo):
        super().__init__()
        self.name, self.skip = info.row["block"], info.row.get("skip")
        self.body = Rows(info.layers)
        self.shortcut = Rows(info.shortcut) if info.shortcut else None
        self.post = nn.Sequential(*_post(info.row, info.out_shape))

    def forward(self, x):
        h = self.body(x)
        if self.skip == "add":
            h = h + (x if self.shortcut is None else self.shortcut(x))
        elif self.skip == "concat":
            h = torch.cat([x, h], dim=1)
        return self.post(h)

    def extra_repr(self) -> str:
        return self.name + (f", skip {self.skip}" if self.skip else "")


class Dense(nn.Module):
    """A fully connected row: flattens its input and reshapes its output (`fc 8x8x256` -> 256x8x8).

    Norm, activation and dropout act on the reshaped output, so `fc 8x8x256, bn` normalises
    each of the 256 channels (BatchNorm2d), as PyTorch implementations of these papers do.
    """

    def __init__(self, n_in: int, out_shape: tuple, bias: bool, post: list[nn.Module]):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.linear = nn.Linear(n_in, math.prod(out_shape), bias=bias)
        self.post = nn.Sequential(*post)

    def forward(self, x):
        return self.post(self.linear(x.flatten(1)).reshape(x.shape[0], *self.out_shape))


class FloatSigmoid(nn.Sigmoid):
    """A sigmoid computed in float32 at least. Under bfloat16 autocast a sigmoid keeps its input's dtype,
    and bfloat16 rounds it to exactly 1 once the logit passes about 6.2 (16.6 in float32): a
    discriminator's cross-entropy then reads log(0), clamped to -100, and its gradient
    p * (1 - p) is 0, so it stops learning from the fakes it is surest of. Without autocast the
    input is float32 (or float64) already and nothing changes."""

    def forward(self, x):
        return torch.sigmoid(x.to(full_precision(x)))


def _activation(name: str, slope: float = 0.01) -> nn.Module:
    return {
        "relu": lambda: nn.ReLU(),
        "lrelu": lambda: nn.LeakyReLU(slope),
        "tanh": lambda: nn.Tanh(),
        "sigmoid": lambda: FloatSigmoid(),
        "elu": lambda: nn.ELU(),
        "gelu": lambda: nn.GELU(),
        "silu": lambda: nn.SiLU(),
        "softplus": lambda: nn.Softplus(),
        "softmax": lambda: nn.Softmax(dim=1),
        "log_softmax": lambda: nn.LogSoftmax(dim=1),
    }[name]()


class VirtualBatchNorm(nn.Module):
    """Virtual batch normalisation (Salimans et al. 2016): each example is normalised with the
    statistics of a fixed reference batch plus itself, so examples in a batch do not depend on
    one another. The network runs its reference batch in front of every batch (TableNet does)."""

    def __init__(self, channels: int, spatial: bool, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.spatial, self.eps = spatial, eps
        self.reference_size = 0  # set by the network before each pass

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.reference_size
        if r == 0:
            raise RuntimeError("virtual batch norm needs the network's reference batch in front of the batch")
        per_example = (lambda t: t.mean((2, 3))) if self.spatial else (lambda t: t)  # (N, C)
        # E[h^2] - E[h]^2 in float32: in bfloat16 (autocast on CUDA) the difference cancels to a
        # few bits, and a variance of 0.12 comes out as 0.0625
        h32 = h.float()
        mean_x, square_x = per_example(h32), per_example(h32 * h32)
        w = 1.0 / (r + 1)
        mean = (1 - w) * mean_x[:r].mean(0) + w * mean_x
        var = ((1 - w) * square_x[:r].mean(0) + w * square_x - mean * mean).clamp_min(0)
        if self.spatial:
            mean, var = mean[:, :, None, None], var[:, :, None, None]
            weight, bias = self.weight[:, None, None], self.bias[:, None, None]
        else:
            weight, bias = self.weight, self.bias
        return (weight * (h32 - mean) / torch.sqrt(var + self.eps) + bias).to(h.dtype)


def _norm(name: str, shape: tuple) -> nn.Module:
    if name == "vbn":
        if len(shape) not in (1, 3):
            raise ValueError("virtual batch norm needs a flat or CxHxW input")
        return VirtualBatchNorm(shape[0], spatial=len(shape) == 3)
    if name == "bn":
        return nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])
    return nn.LayerNorm(list(shape))


def _post(row: dict, shape: tuple) -> list[nn.Module]:
    post: list[nn.Module] = []
    if row.get("norm"):
        post.append(_norm(row["norm"], shape))
    if row.get("act"):
        post.append(_activation(row["act"], row.get("slope", 0.01)))
    if row.get("dropout"):
        post.append(nn.Dropout(row["dropout"]))
    return post


def build_row(row: dict, in_shape: tuple, out_shape: tuple) -> nn.Module:
    op = row["op"]
    bias = row.get("bias", True)
    if op == "fc":
        return Dense(math.prod(in_shape), out_shape, bias, _post(row, out_shape))
    if op == "gaussian" and "kernel" in row:
        channels = row["out"] * (1 if "var" in row else 2)
        return ConvGaussianHead(_conv(row, in_shape, channels, bias), row.get("var"))
    if op == "gaussian":
        return GaussianHead(math.prod(in_shape), out_shape, row.get("var"), bias)
    if op == "conv":
        main = _conv(row, in_shape, row["out"], bias)
    elif op == "deconv":
        p, extra = deconv_padding(row)
        main = nn.ConvTranspose2d(in_shape[0], row["out"], row["kernel"], row["stride"], p, extra, bias=bias)
    elif op == "maxpool":
        main = nn.MaxPool2d(row["kernel"], row["stride"])
    elif op == "avgpool":
        main = nn.AvgPool2d(row["kernel"], row["stride"])
    elif op == "upsample":
        main = nn.Upsample(scale_factor=row["scale"], mode=row.get("mode", "nearest"))
    elif op == "dropout":
        main = nn.Dropout(row["p"])
    elif op == "flatten":
        main = nn.Flatten()
    elif op == "reshape":
        main = Reshape(row["shape"])
    elif op == "crop":
        main = Crop(row["p"])
    elif op in ("bn", "ln", "vbn"):
        main = _norm(op, in_shape)
    elif op == "identity":
        main = nn.Identity()
    elif op == "concat":
        return Concat(_post(row, out_shape))
    elif op == "add":
        return Add(_post(row, out_shape))
    elif op in plugins.LAYERS:
        main = _plugin_row(plugins.LAYERS[op], row, in_shape, out_shape)
    else:
        main = _activation(op, row.get("slope", 0.01))
    post = _post(row, out_shape)
    return nn.Sequential(main, *post) if post else main


def build_info(info: RowInfo) -> nn.Module:
    """The module of a row whose shapes have been inferred: a Block for a block row, else build_row's."""
    if info.row["op"] == "block":
        return Block(info)
    return build_row(info.row, info.in_shape, info.out_shape)


def _plugin_row(layer, row: dict, in_shape: tuple, out_shape: tuple) -> nn.Module:
    """A plugin layer's module, held to what validation counted: `genspec show`, the frozen and
    trainable checks and the memory estimate read the plugin's params(), never the module."""
    module = layer.build(row, tuple(in_shape), tuple(out_shape))
    if not isinstance(module, nn.Module):
        raise RunError(f"plugin layer {layer.name!r} ({layer.module}): build gave {type(module).__name__}, not an nn.Module")
    built, counted = sum(p.numel() for p in module.parameters()), layer.count(row, tuple(in_shape), tuple(out_shape))
    if built != counted:
        raise RunError(f"plugin layer {layer.name!r} ({layer.module}): the module it builds has {built:,} parameters, "
                       f"but its params() counts {counted:,}")
    return module


def _conv(row: dict, in_shape: tuple, channels: int, bias: bool) -> nn.Module:
    left, right, top, bottom = conv_padding(row, in_shape[1], in_shape[2])
    if left == right and top == bottom and left == top:
        return nn.Conv2d(in_shape[0], channels, row["kernel"], row["stride"], left, bias=bias)
    # an even kernel's 'same' padding is one pixel larger right and bottom
    return nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)),
                         nn.Conv2d(in_shape[0], channels, row["kernel"], row["stride"], 0, bias=bias))


REFERENCE_BATCH = 64
LOGITS = "(logits)"  # forward_taps' key for the pre-sigmoid output of a network that ends in a sigmoid; never a tap name


def _strip_final_sigmoid(rows: nn.ModuleList) -> None:
    """Remove the last row's closing sigmoid (TableNet applies it itself, keeping the logits).
    The sigmoid has no parameters, so state-dict keys do not change."""
    last = rows[-1]
    if isinstance(last, FloatSigmoid):
        rows[-1] = nn.Identity()
        return
    container = last.post if isinstance(last, (Dense, Block, Add, Concat)) else last
    if not (isinstance(container, nn.Sequential) and len(container) and isinstance(container[-1], FloatSigmoid)):
        raise AssertionError(f"a row that ends in a sigmoid was built without one: {last}")
    del container[-1]


def _drop(value, n: int):
    if not n:
        return value
    if isinstance(value, Gaussian):
        return Gaussian(value.mean[n:], value.logvar[n:])
    return value[n:]


class TableNet(nn.Module):
    """A network built from a layer table. `forward(x)` gives the last row's output;
    `forward_taps(x)` also gives every named tap, from one pass."""

    def __init__(self, net: Network):
        super().__init__()
        self.rows = Rows(net.info.rows, list(net.conditions), tapped=set(net.info.taps.values()))
        self.ends_in_sigmoid = net.info.ends_in_sigmoid
        if self.ends_in_sigmoid:
            _strip_final_sigmoid(self.rows)
        self.taps = dict(net.info.taps)
        self._tap_at = {i: name for name, i in self.taps.items()}
        self._frozen_rows = [i for i, r in enumerate(net.info.rows) if r.frozen]
        self._virtual_norms = [m for m in self.rows.modules() if isinstance(m, VirtualBatchNorm)]
        self.has_reference = bool(self._virtual_norms)
        if self.has_reference:
            # The reference batch: N(0, I) placeholders, replaced by Model.set_references with draws of
            # the input's latent or real data; one slot for the input and one per condition.
            shapes = [net.input] + [shape for shape, _ in net.conditions.values()]
            for slot, shape in enumerate(shapes):
                self.register_buffer(f"reference_{slot}" if slot else "reference", torch.randn(REFERENCE_BATCH, *shape))

    def set_reference(self, slot: int, value: torch.Tensor) -> None:
        getattr(self, f"reference_{slot}" if slot else "reference").copy_(value)

    def _references(self, count: int) -> list:
        return [getattr(self, f"reference_{slot}" if slot else "reference") for slot in range(count)]

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen row is a fixed function: its batch norm keeps its initial running statistics.
        for i in self._frozen_rows:
            for m in self.rows[i].modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x, *conditions):
        return self.forward_taps(x, *conditions)[None]

    def forward_taps(self, x, *conditions) -> dict:
        """Outputs of every named tap, and the final output under the key None; for a network that
        ends in a sigmoid, the logits it was computed from under LOGITS."""
        skip = 0
        if self._virtual_norms:  # the reference batch rides in front of the batch, then is dropped
            skip = len(self.reference)
            inputs = [torch.cat([ref.to(t.dtype), t]) for ref, t in zip(self._references(1 + len(conditions)), (x, *conditions))]
            x, conditions = inputs[0], inputs[1:]
            for norm in self._virtual_norms:
                norm.reference_size = skip
        out, kept = {}, {}
        last = len(self.rows) - 1
        for i in range(len(self.rows)):
            x = self.rows.step(i, x, kept, conditions)
            if i == last and self.ends_in_sigmoid:
                out[LOGITS] = _drop(x, skip)
                x = torch.sigmoid(x.to(full_precision(x)))  # in float32 at least, as FloatSigmoid
            if i in self._tap_at:
                out[self._tap_at[i]] = _drop(x, skip)
        out[None] = _drop(x, skip)
        return out


def initialise(module: TableNet, net: Network) -> None:
    """Apply the network's `init` to conv, transposed-conv, linear (and, for normal, norm) weights."""
    if net.init == "default":
        return
    for m in module.modules():
        is_weighted = isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
        is_norm = isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))
        if not (is_weighted or (is_norm and net.init == "normal")) or getattr(m, "weight", None) is None:
            continue
        with torch.no_grad():
            if net.init == "normal":
                nn.init.normal_(m.weight, *net.init_args)
            elif net.init == "xavier_uniform":
                nn.init.xavier_uniform_(m.weight)
            elif net.init == "xavier_normal":
                nn.init.xavier_normal_(m.weight)
            elif net.init == "kaiming_normal":
                nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def freeze(module: TableNet, net: Network) -> None:
    """Frozen rows keep their initial weights: no gradient, no optimiser."""
    for row_module, info in zip(module.rows, net.info.rows):
        if info.frozen:
            for p in row_module.parameters():
                p.requires_grad_(False)


def spectral_normalise(module: TableNet, net: Network) -> None:
    """Rows with `sn`: their weight becomes a spectral_norm parametrization (after `initialise`,
    which writes the weight it then normalises)."""
    for row_module, info in _leaf_rows(module.rows, net.info.rows):
        if info.row.get("sn"):
            for m in row_module.modules():
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(m)


def _leaf_rows(modules, infos: list[RowInfo]):
    """(module, info) of every row that is not a block, the rows inside blocks included."""
    for module, info in zip(modules, infos):
        if info.row["op"] == "block":
            yield from _leaf_rows(module.body, info.layers)
            yield from _leaf_rows(module.shortcut or [], info.shortcut)
        else:
            yield module, info


def build_network(net: Network) -> TableNet:
    module = TableNet(net)
    initialise(module, net)
    spectral_normalise(module, net)
    freeze(module, net)
    return module


__all__ = ["Gaussian", "TableNet", "build_network", "F"]
