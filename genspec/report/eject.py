"""`genspec export RUN --format python --out DIR`: a finished run ejected as plain PyTorch source.

DIR gets `networks.py` (one nn.Module class per network, named layers, `forward` written out
line by line, no genspec import; a block row is an instance of a class written for the block, one
class per distinct source, and the output of a row that a later `add` or `concat` row reads is
kept in a local variable named after its tap), `weights.safetensors` (keyed by those modules' state_dicts,
`network.layer.param`, and the latent priors' state as `prior.<latent>.param`), `sample.py`
(draws from the generator as `genspec sample` does: the same calls to the random streams in the
same order, so the same seed gives the same images) and a README.

The source is written from the built modules themselves (each module type has its writer), so
the weights line up by construction; a module it has no writer for, or a tensor it does not
place, is refused with a one-line error rather than written wrongly. A spectrally normalised
weight is written as its value in eval mode (the original weight divided by its largest singular
value as the power iteration estimated it): the ejected module is a plain conv or linear layer
that gives the run's outputs, not one that trains on with the parametrization.
"""

from __future__ import annotations

import inspect
import keyword
from pathlib import Path

import torch
from torch import nn

from genspec.compiler import layers as L
from genspec.errors import RunError
from genspec.lang.rows import format_row
from genspec.graph.grids import generator_of
from genspec.train.finished import PRIOR_PREFIX, FinishedRun
from genspec.train.folder import atomic_write, atomic_write_text

EJECTED_FILES = ("networks.py", "sample.py", "weights.safetensors", "README.md")
# names the generated code uses itself; an input, condition or latent of the same name gets a trailing _
MODULE_NAMES = {"self", "h", "r", "mean", "logvar", "torch", "nn", "F"}
SAMPLER_NAMES = MODULE_NAMES | {"n", "seed", "label", "networks", "priors", "rows", "ends", "t", "math", "argparse",
                                "load", "save_image", "sample", "interpolate", "to_unit", "main", "STEPS"}
# the top-level names of networks.py besides the classes of the networks: a block's class avoids them
TOP_LEVEL_NAMES = {"Path", "torch", "nn", "F", "WEIGHTS", "NETWORKS", "LATENTS", "load", "VirtualBatchNorm", "resize_conv"}


class EjectError(RunError):
    """What the eject cannot write: one line, saying what and where."""


def python_name(name: str, taken: set, reserved: set = MODULE_NAMES) -> str:
    """`name` as a Python variable: not a keyword, not a name the generated code uses, not `taken`."""
    out = name if name.isidentifier() else "v_" + "".join(c if c.isalnum() else "_" for c in name)
    while keyword.iskeyword(out) or out in reserved or out in taken:
        out += "_"
    taken.add(out)
    return out


def class_name(network: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in network.split("_") if part) or "Network"


def dims(shape) -> str:
    return ", ".join(map(str, shape))


def shape_text(shape) -> str:
    return "x".join(map(str, shape))


def number(value) -> str:
    """A number as exact Python source (repr of a float round-trips)."""
    return str(value) if isinstance(value, (int, bool)) else repr(float(value))


def pair(value) -> str:
    """A kernel, stride or padding: one number when square."""
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return number(value[0]) if len(set(value)) == 1 else repr(tuple(value))


def own_tensors(module: nn.Module) -> bool:
    return bool(list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)))


def plain_state(module: nn.Module) -> dict:
    """A layer's state as its plain torch twin holds it: a spectrally normalised weight materialised."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("parametrizations.")}
    with torch.no_grad():
        for name in module.parametrizations:
            state[name] = getattr(module, name).detach().clone()
    return state


def layer_type(module: nn.Module) -> type:
    """The module's class; for a weight under a parametrization (spectral norm), the layer's own
    class, which torch subclasses as Parametrized<Layer>."""
    from torch.nn.utils import parametrize

    kind = type(module)
    if parametrize.is_parametrized(module) and kind.__bases__[0] in (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, L.ResizeConv2d) \
            and set(module.parametrizations) == {"weight"}:
        return kind.__bases__[0]
    return kind


class ClassWriter:
    """The `__init__` and `forward` lines of one generated nn.Module class (a network's, or a block's),
    written from the built modules, and the tensors that go with them under the class's own keys.

    The running tensor is `h` (the shortcut of a block writes `shortcut`); the output of a row that
    a later `add` or `concat` row reads is kept in a local variable named after its tap."""

    def __init__(self, network: str, input_var: str, blocks: "BlockClasses", local_names: set, reserved: set):
        self.network, self.blocks = network, blocks
        self.init: list[str] = []
        self.body: list[str] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.helpers: set[str] = set()
        self.counts: dict[str, int] = {}
        self.attributes: set[str] = set()
        self.placed: set[int] = set()  # ids of the modules whose tensors went into weights
        self.locals, self.reserved = local_names, reserved
        self.current = input_var  # the variable holding the running tensor
        self.target = "h"  # the variable a step assigns
        self.needs_reference = False  # a virtual batch norm in it: forward takes the reference size r
        self.where = ""  # the row being written, for refusals
        self.outer = ""  # for a block's rows: the table's block row that holds them

    # ------------------------------------------------------------------ pieces

    def refuse(self, what: str):
        raise EjectError(f"cannot eject network {self.network!r}, {self.where}: {what}; "
                         "`genspec export --format safetensors` keeps the run for genspec instead")

    def attribute(self, prefix: str, constructor: str, note: str = "") -> str:
        """A named submodule line (`self.fc1 = nn.Linear(...)`); its attribute name."""
        while True:
            self.counts[prefix] = self.counts.get(prefix, 0) + 1
            attr = f"{prefix}{self.counts[prefix]}"
            if attr not in self.attributes:
                break
        self.attributes.add(attr)
        self.init.append(f"self.{attr} = {constructor}" + (f"  # {note}" if note else ""))
        return attr

    def layer(self, prefix: str, constructor: str, module: nn.Module, note: str = "") -> str:
        """A named submodule holding `module`'s tensors; its attribute name."""
        attr = self.attribute(prefix, constructor, note)
        for key, tensor in plain_state(module).items():
            self.weights[f"{attr}.{key}"] = tensor
        self.placed.update(id(m) for m in module.modules())
        return attr

    def step(self, expression: str) -> None:
        """h = EXPRESSION, where {h} in it stands for the running tensor."""
        self.body.append(f"{self.target} = {expression.format(h=self.current)}")
        self.current = self.target

    # ------------------------------------------------------------------ rows

    def write_rows(self, rows: L.Rows, infos: list, label: str = "", last_row_hook=None) -> None:
        """A table's or a block's rows in order, each under a comment of its spec text. `label` is
        the rows' place as `genspec show` numbers them ("" for a table, "1." for block row 1's)."""
        kept: dict[int, str] = {}  # row index -> the variable holding its output, for later add / concat rows
        for i, (row_module, row_info) in enumerate(zip(rows, infos)):
            self.where = self.place(label, i, row_info)
            self.body.append(f"# {format_row(row_info.row)}".replace("\n", " "))
            op = row_info.row["op"]
            if op in ("add", "concat") and row_info.source is not None:
                self.skip(row_module, row_info, kept[row_info.source], infos[row_info.source].out_shape)
            elif op == "concat":
                self.condition(row_module, row_info)
            elif op == "block":
                self.block(row_module, row_info, f"{label}{i}.")
            elif type(row_module) in (L.GaussianHead, L.ConvGaussianHead):
                self.gaussian(row_module, row_info, i == len(infos) - 1)
            else:
                self.write(row_module, row_info.in_shape)
            if i in rows.kept:  # before the sigmoid TableNet puts after its last row, as Rows.step keeps it
                tap = row_info.row["name"]
                kept[i] = python_name(tap, self.locals, self.reserved)
                self.body.append(f"{kept[i]} = {self.current}  # the tap {tap!r}{self.tap_note(tap)}, which a later row reads")
            if last_row_hook is not None:
                last_row_hook(i, row_info)

    def tap_note(self, tap: str) -> str:
        return ""  # a block's taps are its own

    def place(self, label: str, i: int, row_info) -> str:
        """Where a row is, for a refusal: `row 1 (block up ch=64)`, or inside a block `row 1.3 (conv ...)
        inside row 1 (block up ch=64)`."""
        here = f"row {label}{i} ({format_row(row_info.row)})".replace("\n", " ")
        return f"{here} inside {self.outer}" if self.outer else here

    def skip(self, m: nn.Module, row_info, earlier: str, earlier_shape) -> None:
        """`add NAME` (the running tensor plus the kept output) or `concat NAME` of an earlier row's tap."""
        if type(m) is L.Add:
            self.step(f"{{h}} + {earlier}")
        elif type(m) is L.Concat:
            self.join(earlier, earlier_shape, row_info.in_shape)
        else:
            self.refuse(f"it has no writer for a {type(m).__module__}.{type(m).__qualname__} module")
        self.write(m.post, row_info.out_shape)

    def condition(self, m: nn.Module, row_info) -> None:
        self.refuse("a concat of a condition inside a block")  # shape inference allows none; a network writes them

    def join(self, other: str, other_shape, in_shape) -> None:
        """torch.cat of the running tensor and `other` along dim 1, as layers.Concat joins them."""
        if len(in_shape) == 3 and len(other_shape) == 1:  # flat values as constant feature maps
            _, height, width = in_shape
            self.step(f"torch.cat([{{h}}, {other}[:, :, None, None].expand(-1, -1, {height}, {width})], dim=1)")
        elif len(in_shape) == len(other_shape):
            self.step(f"torch.cat([{{h}}, {other}], dim=1)")
        else:
            self.refuse(f"a concat of a {len(other_shape)}-d tensor onto a {len(in_shape)}-d tensor")

    def block(self, m: nn.Module, row_info, label: str) -> None:
        """A block row: a submodule of the block's generated class, then the row's own norm and activation."""
        if type(m) is not L.Block:
            self.refuse(f"it has no writer for a {type(m).__module__}.{type(m).__qualname__} module")
        inner = BlockWriter(self.network, self.blocks)
        inner.where = inner.outer = self.outer or self.where
        name = inner.write_block(m, row_info, label)
        prefix = "".join(c if c.isalnum() else "_" for c in row_info.row["block"]).lower()
        attr = self.attribute(prefix if prefix[:1].isalpha() else "block_" + prefix, f"{name}()")
        self.weights.update({f"{attr}.{key}": tensor for key, tensor in inner.weights.items()})
        self.placed |= inner.placed
        self.helpers |= inner.helpers
        self.needs_reference |= inner.needs_reference
        self.step(f"self.{attr}({{h}}{', r' if inner.needs_reference else ''})")
        self.write(m.post, row_info.out_shape)

    # ------------------------------------------------------------------ module types

    def write(self, m: nn.Module, in_shape: tuple) -> None:
        kind = layer_type(m)
        if kind is nn.Sequential:
            for child in m:
                self.write(child, in_shape)
        elif kind is L.Dense:
            flat = ".flatten(1)" if len(in_shape) > 1 else ""
            self.step(f"self.{self.layer('fc', self.linear(m.linear), m.linear, self.sn_note(m.linear))}({{h}}{flat})")
            if len(m.out_shape) > 1:
                self.step(f"{{h}}.reshape(-1, {dims(m.out_shape)})")
            self.write(m.post, m.out_shape)
        elif kind is nn.ZeroPad2d:
            self.step(f"F.pad({{h}}, {tuple(m.padding)!r})  # 'same' padding, one pixel more right and bottom")
        elif kind is nn.Conv2d:
            self.step(f"self.{self.layer('conv', self.conv(m), m, self.sn_note(m))}({{h}})")
        elif kind is L.ResizeConv2d:  # an upsample row and the conv row after it, computed as genspec does
            self.helpers.add("resize_conv")
            conv = f"self.{self.layer('conv', self.conv(m), m, self.sn_note(m))}"
            self.step(f"resize_conv({{h}}, {conv}.weight, {conv}.bias, {m.scale}, {tuple(m.padding)!r})"
                      f"  # = {conv}(F.interpolate({{h}}, scale_factor={m.scale}, mode='nearest'))")
        elif kind is nn.ConvTranspose2d:
            self.step(f"self.{self.layer('deconv', self.conv(m), m, self.sn_note(m))}({{h}})")
        elif kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            extra = "" if (m.eps, m.momentum, m.affine, m.track_running_stats) == (1e-5, 0.1, True, True) else \
                f", eps={number(m.eps)}, momentum={number(m.momentum)}, affine={m.affine}, track_running_stats={m.track_running_stats}"
            self.step(f"self.{self.layer('bn', f'nn.{kind.__name__}({m.num_features}{extra})', m)}({{h}})")
        elif kind is nn.LayerNorm:
            extra = "" if m.eps == 1e-5 and m.elementwise_affine else f", eps={number(m.eps)}, elementwise_affine={m.elementwise_affine}"
            self.step(f"self.{self.layer('ln', f'nn.LayerNorm({list(m.normalized_shape)}{extra})', m)}({{h}})")
        elif kind is L.VirtualBatchNorm:
            self.helpers.add("VirtualBatchNorm")
            self.needs_reference = True
            args = f"{m.weight.shape[0]}" + (", spatial=True" if m.spatial else "") + ("" if m.eps == 1e-5 else f", eps={number(m.eps)}")
            self.step(f"self.{self.layer('vbn', f'VirtualBatchNorm({args})', m)}({{h}}, r)")
        elif kind is nn.Dropout:
            self.step(f"self.{self.layer('dropout', f'nn.Dropout({number(m.p)})', m)}({{h}})")
        elif kind in ACTIVATIONS:
            self.step(ACTIVATIONS[kind](m))
        elif kind is nn.MaxPool2d and (m.padding, m.dilation, m.ceil_mode, m.return_indices) == (0, 1, False, False):
            self.step(f"F.max_pool2d({{h}}, {pair(m.kernel_size)}, {pair(m.stride)})")
        elif kind is nn.AvgPool2d and (m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override) == (0, False, True, None):
            self.step(f"F.avg_pool2d({{h}}, {pair(m.kernel_size)}, {pair(m.stride)})")
        elif kind is nn.Upsample and m.size is None and m.align_corners is None and m.recompute_scale_factor is None:
            self.step(f"F.interpolate({{h}}, scale_factor={number(m.scale_factor)}, mode={m.mode!r})")
        elif kind is nn.Flatten and (m.start_dim, m.end_dim) == (1, -1):
            self.step("{h}.flatten(1)")
        elif kind is L.Reshape:
            self.step(f"{{h}}.reshape(-1, {dims(m.shape)})")
        elif kind is L.Crop:
            self.step(f"{{h}}[..., {m.p}:-{m.p}, {m.p}:-{m.p}]")
        elif kind is nn.Identity:
            pass
        else:
            self.refuse(f"it has no writer for a {kind.__module__}.{kind.__qualname__} module")
        if own_tensors(m) and id(m) not in self.placed:
            self.refuse(f"the tensors of its {kind.__name__} have no place in the ejected module")

    def linear(self, m: nn.Linear) -> str:
        return f"nn.Linear({m.in_features}, {m.out_features}" + ("" if m.bias is not None else ", bias=False") + ")"

    def conv(self, m) -> str:
        if m.dilation != (1, 1) or m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            self.refuse("a convolution with dilation, groups or another padding mode")
        args = [str(m.in_channels), str(m.out_channels), pair(m.kernel_size)]
        if m.stride != (1, 1):
            args.append(f"stride={pair(m.stride)}")
        if m.padding != (0, 0):
            args.append(f"padding={pair(m.padding)}")
        if isinstance(m, nn.ConvTranspose2d) and m.output_padding != (0, 0):
            args.append(f"output_padding={pair(m.output_padding)}")
        if m.bias is None:
            args.append("bias=False")
        kind = nn.Conv2d if layer_type(m) is L.ResizeConv2d else layer_type(m)  # it holds a plain conv's weights
        return f"nn.{kind.__name__}({', '.join(args)})"

    @staticmethod
    def sn_note(m: nn.Module) -> str:
        from torch.nn.utils import parametrize

        return "spectral norm: the weight as normalised in eval mode" if parametrize.is_parametrized(m) else ""

    def gaussian(self, m: nn.Module, row_info, last: bool) -> None:
        self.refuse("a gaussian head inside a block")  # expansion allows none; a network writes its own


BLOCK_NAMES = MODULE_NAMES | {"x", "shortcut"}  # the names a block's forward uses itself


class BlockWriter(ClassWriter):
    """One block row as an instance of a generated class: `x` its input, its rows on `h`, its
    shortcut on `shortcut`, then the skip (the row's own norm and activation stay in the caller)."""

    def __init__(self, network: str, blocks: "BlockClasses"):
        super().__init__(network, "x", blocks, {"x"}, BLOCK_NAMES)

    def write_block(self, m: L.Block, info, label: str) -> str:
        """Write the block's class (or find the same one written before); its class name."""
        self.write_rows(m.body, info.layers, label)
        out = self.current
        if m.skip == "add":
            added = "x"
            if m.shortcut is not None:
                self.current, self.target = "x", "shortcut"
                self.body.append("# the shortcut: the input brought to the rows' shape")
                self.write_rows(m.shortcut, info.shortcut, label + "s")
                added, self.current, self.target = self.current, out, "h"
            self.step(f"{{h}} + {added}  # skip: add")
        elif m.skip == "concat":
            self.step("torch.cat([x, {h}], dim=1)  # skip: concat, the input's channels first")
        self.body.append(f"return {self.current}")
        return self.blocks.name_for(info.row["block"], lambda name: self.render(name, info))

    def render(self, name: str, info) -> str:
        used = format_row({"op": "block", "block": info.row["block"], "args": info.row.get("args", {})})
        # the input's channels (or features) tell apart the classes of one block used on different inputs
        on = f"{info.in_shape[0]} {'channels' if len(info.in_shape) == 3 else 'features'}"
        skip = {"add": "its rows' output plus " + ("its shortcut of the input" if info.shortcut else "its input"),
                "concat": "its input and its rows' output joined along the channels"}.get(info.row.get("skip"),
                                                                                           "its rows in order")
        lines = [f"class {name}(nn.Module):",
                 f'    """`{used}` of the spec, on {on}: {skip}."""',
                 "", "    def __init__(self):", "        super().__init__()"]
        lines += [f"        {line}" for line in self.init]
        lines += ["", f"    def forward(self, x{', r' if self.needs_reference else ''}):"]
        lines += [f"        {line}" for line in self.body]
        return "\n".join(lines) + "\n"


class BlockClasses:
    """The classes written for block rows, across every network: one per distinct source, so a block
    used twice alike (`block up ch=64` twice) is one class with two instances."""

    def __init__(self, taken: set):
        self.taken = set(taken)  # class names in use: the networks' and the helpers'
        self.by_source: dict[str, str] = {}  # the class source with a stand-in name -> its class name
        self.sources: list[str] = []

    def name_for(self, block: str, render) -> str:
        key = render("BLOCK")
        if key not in self.by_source:
            base = class_name(block) + "Block"
            name, n = base, 1
            while name in self.taken:
                n += 1
                name = f"{base}{n}"
            self.taken.add(name)
            self.by_source[key] = name
            self.sources.append(render(name))
        return self.by_source[key]


class NetworkWriter(ClassWriter):
    """Writes one network as an nn.Module class: `__init__` lines, `forward` lines and its weights."""

    def __init__(self, name: str, spec_net, module: L.TableNet, blocks: BlockClasses):
        taken: set = set()
        input_var = python_name(spec_net.input_source or "x", taken)
        conditions = [python_name(c, taken) for c in spec_net.conditions]
        super().__init__(name, input_var, blocks, taken, MODULE_NAMES)
        self.name, self.net, self.module = name, spec_net, module
        self.input, self.conditions = input_var, conditions

    def tap_note(self, tap: str) -> str:
        return f" ({self.name}.{tap} in the spec)"

    def condition(self, m: nn.Module, row_info) -> None:
        condition = self.conditions[list(self.net.conditions).index(row_info.row["input"])]
        self.join(condition, self.net.conditions[row_info.row["input"]][0], row_info.in_shape)
        self.write(m.post, row_info.out_shape)

    def gaussian(self, m: nn.Module, row_info, last: bool) -> None:
        if not last:
            self.refuse("a gaussian head before the last row")
        if type(m) is L.GaussianHead:
            flat = ".flatten(1)" if len(row_info.in_shape) > 1 else ""
            self.step(f"self.{self.layer('gaussian', self.linear(m.linear), m.linear, self.sn_note(m.linear))}({{h}}{flat})")
            reshape = f".reshape(-1, {dims(m.out_shape)})" if len(m.out_shape) > 1 else ""
        else:  # a conv (after a padding, for an even kernel's 'same')
            for part in (m.conv if type(m.conv) is nn.Sequential else [m.conv]):
                if layer_type(part) is nn.Conv2d:
                    self.step(f"self.{self.layer('gaussian', self.conv(part), part, self.sn_note(part))}({{h}})")
                else:
                    self.write(part, row_info.in_shape)
            reshape = ""
        if m.fixed_logvar is not None:
            self.body.append(f"mean = h{reshape}")
            self.body.append(f"logvar = torch.full_like(mean, {number(m.fixed_logvar)})  # fixed: var = exp(logvar)")
        else:
            self.body.append("mean, logvar = h.chunk(2, dim=1)")
            if reshape:
                self.body += [f"mean = mean{reshape}", f"logvar = logvar{reshape}"]
        self.placed.add(id(m))

    # ------------------------------------------------------------------ the class

    def source(self) -> str:
        info, module = self.net.info, self.module
        head: list[str] = []
        inputs = [self.input, *self.conditions]
        if module.has_reference:
            shapes = [self.net.input] + [shape for shape, _ in self.net.conditions.values()]
            init_refs = ["# the reference batch of the virtual batch norms (one for the input, one per condition)"]
            for slot, (var, shape) in enumerate(zip(inputs, shapes)):
                buffer = "reference" if slot == 0 else f"reference_{var}"
                init_refs.append(f'self.register_buffer("{buffer}", torch.zeros({L.REFERENCE_BATCH}, {dims(shape)}))')
                self.weights[buffer] = getattr(module, "reference" if slot == 0 else f"reference_{slot}").detach().clone()
                head.append(f"{var} = torch.cat([self.{buffer}, {var}])")
            self.init[:0] = init_refs
            head = ["# the reference batch runs in front of the batch (each example is normalised against it)",
                    "# and is dropped from the output", "r = len(self.reference)", *head]
            self.placed.add(id(module))
        last = len(info.rows) - 1

        def after_row(i: int, row_info) -> None:
            if i == last and module.ends_in_sigmoid:  # TableNet keeps the logits and applies the sigmoid after the row
                self.step("torch.sigmoid({h})")
            tap = [name for name, index in info.taps.items() if index == i]
            if tap and i not in module.rows.kept:  # a kept tap's line says so already
                self.body.append(f"# the tap {tap[0]!r} ({self.name}.{tap[0]} in the spec) is {self.current} here")

        self.write_rows(module.rows, info.rows, last_row_hook=after_row)
        unplaced = [m for m in module.modules() if own_tensors(m) and id(m) not in self.placed]
        if unplaced:
            self.refuse(f"the tensors of its {type(unplaced[0]).__name__} have no place in the ejected module")
        cut = "[r:]" if module.has_reference else ""
        if info.kind == "dist":
            self.body.append(f"return mean{cut}, logvar{cut}")
        else:
            self.body.append(f"return {self.current}{cut}")
        return self.render(head)

    def render(self, head: list[str]) -> str:
        ins = " and ".join(f"{v} ({shape_text(s)})" for v, s in
                           zip([self.input, *self.conditions], [self.net.input, *[s for s, _ in self.net.conditions.values()]]))
        out = ("a diagonal Gaussian over " + shape_text(self.net.info.output) + " as (mean, logvar)"
               if self.net.info.kind == "dist" else shape_text(self.net.info.output))
        lines = [f"class {class_name(self.name)}(nn.Module):",
                 f'    """{self.name}: {ins} -> {out}; the spec\'s layer table, a comment above each row\'s lines."""',
                 "", "    def __init__(self):", "        super().__init__()"]
        lines += [f"        {line}" for line in self.init]
        lines += ["", f"    def forward(self, {', '.join([self.input, *self.conditions])}):"]
        lines += [f"        {line}" for line in head + self.body]
        return "\n".join(lines) + "\n"


ACTIVATIONS = {
    nn.ReLU: lambda m: "F.relu({h})",
    nn.LeakyReLU: lambda m: f"F.leaky_relu({{h}}, {number(m.negative_slope)})",
    nn.Tanh: lambda m: "torch.tanh({h})",
    L.FloatSigmoid: lambda m: "torch.sigmoid({h})",
    nn.ELU: lambda m: "F.elu({h})" if m.alpha == 1.0 else f"F.elu({{h}}, {number(m.alpha)})",
    nn.GELU: lambda m: "F.gelu({h})" if m.approximate == "none" else f"F.gelu({{h}}, approximate={m.approximate!r})",
    nn.SiLU: lambda m: "F.silu({h})",
    nn.Softplus: lambda m: "F.softplus({h})" if (m.beta, m.threshold) == (1.0, 20.0) else
    f"F.softplus({{h}}, {number(m.beta)}, {number(m.threshold)})",
    nn.Softmax: lambda m: f"F.softmax({{h}}, dim={m.dim})",
    nn.LogSoftmax: lambda m: f"F.log_softmax({{h}}, dim={m.dim})",
}


VIRTUAL_BATCH_NORM = '''\
class VirtualBatchNorm(nn.Module):
    """Virtual batch normalisation (Salimans et al. 2016): each example is normalised with the
    statistics of a fixed reference batch (the first `reference_size` examples of the batch it
    is given) plus itself, so that examples in a batch do not depend on one another."""

    def __init__(self, channels, spatial=False, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.spatial, self.eps = spatial, eps

    def forward(self, h, reference_size):
        r = reference_size
        h32 = h.float()  # E[h^2] - E[h]^2 in float32 at least
        if self.spatial:  # per example and channel: means over height and width
            mean_x, square_x = h32.mean((2, 3)), (h32 * h32).mean((2, 3))
        else:
            mean_x, square_x = h32, h32 * h32
        w = 1.0 / (r + 1)
        mean = (1 - w) * mean_x[:r].mean(0) + w * mean_x
        var = ((1 - w) * square_x[:r].mean(0) + w * square_x - mean * mean).clamp_min(0)
        if self.spatial:
            mean, var = mean[:, :, None, None], var[:, :, None, None]
            weight, bias = self.weight[:, None, None], self.bias[:, None, None]
        else:
            weight, bias = self.weight, self.bias
        return (weight * (h32 - mean) / torch.sqrt(var + self.eps) + bias).to(h.dtype)
'''


def networks_source(run: FinishedRun, writers: list[NetworkWriter], blocks: BlockClasses, version: str) -> str:
    classes = [w.source() for w in writers]  # before the helpers and blocks: writing a class finds those it needs
    helpers = set().union(*(w.helpers for w in writers))
    table = ", ".join(f'"{w.name}": {class_name(w.name)}' for w in writers)
    latents = ", ".join(f'"{name}"' for name in run.priors)
    parts = [f'''\
"""The networks of the genspec run {run.spec.name!r} (epoch {run.epoch}), ejected by `genspec export
--format python` (genspec {version}): plain PyTorch modules, one per network, that need no genspec.
weights.safetensors holds the trained weights; `load()` gives the networks with them, in eval mode."""

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS = Path(__file__).with_name("weights.safetensors")
''']
    if "VirtualBatchNorm" in helpers:
        parts.append(VIRTUAL_BATCH_NORM)
    if "resize_conv" in helpers:  # genspec's own function, so the ejected networks compute the same bits
        parts.append(inspect.getsource(L.resize_conv))
    parts += blocks.sources + classes
    parts.append(f'''\
NETWORKS = {{{table}}}
LATENTS = ({latents}{',' if len(run.priors) == 1 else ''})


def load(weights=WEIGHTS):
    """(networks, priors): each network with its trained weights, in eval mode, by name; and the
    latent priors' state (a categorical latent's class weights `c.weights`, a codebook's `z.codes`)."""
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    networks = {{}}
    for name, network_class in NETWORKS.items():
        network = network_class()
        network.load_state_dict({{key[len(name) + 1:]: value for key, value in tensors.items()
                                 if key.startswith(name + ".")}}, strict=True)
        networks[name] = network.eval()
    priors = {{key[len("{PRIOR_PREFIX}"):]: value for key, value in tensors.items()
              if key.startswith("{PRIOR_PREFIX}") and key.split(".")[1] in LATENTS}}
    return networks, priors
''')
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------- sample.py

def prior_draw(name: str, latent) -> list[str]:
    """The body of draw_<latent>(n, priors): the calls the genspec prior's `sample` makes."""
    shape = tuple(latent.shape)
    if latent.prior == "normal":
        return [f'"""Latent {name}: standard normal, shape {shape_text(shape)}."""', f"return torch.randn((n, {dims(shape)}))"]
    if latent.prior == "uniform":
        low, high = latent.prior_args
        return [f'"""Latent {name}: uniform on [{number(low)}, {number(high)}], shape {shape_text(shape)}."""',
                f"return torch.rand((n, {dims(shape)})) * {number(high - low)} + {number(low)}"]
    if latent.prior == "categorical":
        return [f'"""Latent {name}: one-hot draws of {shape[0]} classes with the trained class weights."""',
                f'classes = torch.multinomial(priors["{name}.weights"], n, replacement=True)',
                f"return F.one_hot(classes, {shape[0]}).float()"]
    if latent.prior == "codebook":
        return [f'"""Latent {name}: a uniformly drawn codebook entry at each position, {shape_text(shape)}."""',
                f'codes = priors["{name}.codes"]',
                f"index = torch.randint(len(codes), (n, {dims(shape[1:])}))" if len(shape) > 1 else
                "index = torch.randint(len(codes), (n,))",
                "return codes[index].movedim(-1, 1)"]
    raise EjectError(f"cannot eject the sampler: latent {name!r} has a {latent.prior} prior, which sample.py cannot "
                     "draw from yet; `genspec export --format safetensors` keeps the run for genspec instead")


def sample_source(run: FinishedRun, source: tuple) -> str:
    from genspec.compiler.priors import CategoricalPrior

    spec = run.spec
    net_name, latent_name, condition_latents = source
    taken: set = set()
    draw_names = {name: python_name(f"draw_{name}", taken, SAMPLER_NAMES)
                  for name in dict.fromkeys([latent_name, *condition_latents])}
    latent_var = python_name(latent_name, taken, SAMPLER_NAMES)
    condition_vars = [python_name(c, taken, SAMPLER_NAMES) for c in condition_latents]
    categorical = [i for i, c in enumerate(condition_latents) if isinstance(run.priors[c], CategoricalPrior)]
    labelled = len(categorical) == 1
    steps = spec.evaluate["interpolation_steps"]
    latent_shape = tuple(spec.latents[latent_name].shape)
    unit = "images = (images + 1) / 2  # the data's range [-1, 1] to [0, 1]\n    " \
        if list(spec.data.get("range", [0, 1])) == [-1, 1] else ""
    call = f'networks["{net_name}"]'

    def conditions(count: str, per_row: bool = False) -> list[str]:
        lines = []
        for i, (var, latent) in enumerate(zip(condition_vars, condition_latents)):
            draw = f"{draw_names[latent]}({count}, priors)"
            if labelled and i == categorical[0]:
                classes = spec.latents[latent].shape[0]
                lines.append(f"{var} = {draw} if label is None else F.one_hot(torch.full(({count},), label), {classes}).float()")
            else:
                lines.append(f"{var} = {draw}")
            if per_row:
                lines.append(f"{var} = {var}.repeat_interleave(STEPS, dim=0)  # one draw per row")
        return lines

    draws = []
    for name, function in draw_names.items():
        body = prior_draw(name, spec.latents[name])
        draws.append(f"def {function}(n, priors):\n" + "\n".join(f"    {line}" for line in body) + "\n")
    draws_text = "\n\n".join(draws)
    label_param = ", label=None" if labelled else ""
    label_doc = (f"; `label`: the class of the condition {condition_latents[categorical[0]]!r} for every image "
                 "(None: drawn)" if labelled else "")
    args = ", ".join([latent_var, *condition_vars])
    sample_lines = [f"{latent_var} = {draw_names[latent_name]}(n, priors)", *conditions("n"),
                    f"return {call}({args})"]
    interp_lines = [f"ends = {draw_names[latent_name]}(2 * rows, priors).view(rows, 2, {dims(latent_shape)})",
                    f"t = torch.linspace(0, 1, STEPS).view(1, STEPS, {dims([1] * len(latent_shape))})",
                    f"{latent_var} = ends[:, :1] * (1 - t) + ends[:, 1:] * t  # a straight line between two draws per row",
                    *conditions("rows", per_row=True),
                    f"return {call}({latent_var}.reshape(rows * STEPS, {dims(latent_shape)}){''.join(', ' + v for v in condition_vars)})"]
    if labelled:
        classes = spec.latents[condition_latents[categorical[0]]].shape[0]
        label_check = f'''
    if args.label is not None and not 0 <= args.label < {classes}:
        parser.error("--label {{}}: the condition {condition_latents[categorical[0]]!r} has classes 0 to {classes - 1}".format(args.label))'''
        label_option = f'''
    parser.add_argument("--label", type=int, help="the class of the condition {condition_latents[categorical[0]]!r} to draw (e.g. 7)")'''
        label_arg = ", args.label"
    else:
        label_check = label_option = label_arg = ""
    indent = "\n        "
    return f'''\
"""Fresh samples from the generator {net_name!r} of the genspec run {spec.name!r} (epoch {run.epoch}), drawn
as `genspec sample` draws them: the same calls to torch's random stream in the same order, so the
same --seed gives the same images. No genspec needed: torch, torchvision and safetensors.

    python sample.py --n 64 --seed 0 --out samples.png{' [--label K]' if labelled else ''}
    python sample.py --interpolate --out interpolations.png
"""

import argparse
import math

import torch
from torch.nn import functional as F
from torchvision.utils import save_image

from networks import load

STEPS = {steps}  # evaluate.interpolation_steps of the run: images per interpolation row


{draws_text}

def sample(n, seed=0{label_param}):
    """n images from {net_name}({latent_name}), in the data's range{label_doc}."""
    networks, priors = load()
    torch.manual_seed(seed)
    with torch.no_grad():
        {indent.join(sample_lines)}


def interpolate(rows, seed=0{label_param}):
    """rows x STEPS images: each row decodes a straight line in latent space between two prior draws
    (the conditions are drawn once per row)."""
    networks, priors = load()
    torch.manual_seed(seed)
    with torch.no_grad():
        {indent.join(interp_lines)}


def to_unit(images):
    """Images in the data's range -> [0, 1] for saving."""
    {unit}return images.clamp(0, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images to draw; with --interpolate, rounded up to whole rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="PNG file to write (default samples.png, or interpolations.png)")
    parser.add_argument("--interpolate", action="store_true", help="an interpolation grid instead"){label_option}
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be a positive number of images, got {{}}".format(args.n)){label_check}
    if args.interpolate:
        images, nrow = interpolate(math.ceil(args.n / STEPS), args.seed{label_arg}), STEPS
    else:
        images, nrow = sample(args.n, args.seed{label_arg}), math.ceil(math.sqrt(args.n))
    out = args.out or ("interpolations.png" if args.interpolate else "samples.png")
    save_image(to_unit(images), out, nrow=nrow, padding=2, pad_value=0.5)
    print("wrote {{}} images from {net_name}({latent_name}) to {{}}".format(len(images), out))


if __name__ == "__main__":
    main()
'''


def readme(run: FinishedRun, source: tuple | None, version: str) -> str:
    names = ", ".join(f"`{class_name(n)}` ({n})" for n in run.networks)
    sampler = (f"`python sample.py --n 64 --seed 0` draws from `{source[0]}({source[1]})` as `genspec sample` does "
               "(the same seed gives the same images; `--interpolate` for an interpolation grid)."
               if source else "The run has no network that maps latent draws alone to images, so there is no sample.py.")
    return (f"# {run.spec.name}, ejected\n\n"
            f"The networks of the genspec run `{run.spec.name}` (epoch {run.epoch}) as plain PyTorch, written by "
            f"`genspec export --format python` (genspec {version}); nothing here imports genspec. `networks.py` has "
            f"{names}; `networks.load()` gives them with the trained weights of `weights.safetensors`. {sampler} "
            "Needs torch, torchvision and safetensors.\n")


def eject(run: FinishedRun, out: Path, version: str) -> list[Path]:
    """Write the ejected package into `out` (created; it must be empty or hold an earlier eject)."""
    from safetensors.torch import save

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; --format python writes a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EJECTED_FILES) if out.is_dir() else []
    if foreign:
        raise RunError(f"--out {out} holds files that are not an eject's ({', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}); give an empty or new folder")
    if "prior" in run.networks:
        raise RunError("cannot eject: a network named 'prior' would share its weight keys with the latent priors'")
    blocks = BlockClasses(TOP_LEVEL_NAMES | {class_name(name) for name in run.networks})
    writers = [NetworkWriter(name, run.spec.networks[name], module, blocks) for name, module in run.networks.items()]
    code = networks_source(run, writers, blocks, version)  # writes every class first: a refusal leaves nothing behind
    source = generator_of(run.spec)
    sampler = sample_source(run, source) if source else None
    weights = {f"{w.name}.{key}": t.contiguous() for w in writers for key, t in w.weights.items()}
    for name, prior in run.priors.items():
        weights.update({f"{PRIOR_PREFIX}{name}.{key}": t.detach().clone().contiguous() for key, t in prior.state_dict().items()})
    blob = save(weights, metadata={"genspec_run": run.spec.name, "epoch": str(run.epoch)})
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "networks.py", out / "weights.safetensors", out / "README.md"]
    atomic_write_text(out / "networks.py", code)
    atomic_write(out / "weights.safetensors", lambda f: f.write(blob), "wb")
    atomic_write_text(out / "README.md", readme(run, source, version))
    if sampler is not None:
        atomic_write_text(out / "sample.py", sampler)
        written.append(out / "sample.py")
    else:
        (out / "sample.py").unlink(missing_ok=True)  # an earlier eject's, of another run
    return written

