"""Layer-table rows: compact strings (as papers print them) to canonical mappings.

    conv 64 5x5 /2, bn, relu         -> {op: conv, out: 64, kernel: 5, stride: 2, norm: bn, act: relu}
    deconv 32 5x5 x2, bn, relu       -> {op: deconv, out: 32, kernel: 5, stride: 2, norm: bn, act: relu}
    fc 8x8x256, bn, relu             -> {op: fc, out: [256, 8, 8], norm: bn, act: relu}   (paper HxWxC, torch CxHxW)
    lrelu 0.2                        -> {op: lrelu, slope: 0.2}
    gaussian 16 var=1e-6             -> {op: gaussian, out: 16, var: 1.0e-06}
    conv 256 5x5 /2, relu  as feats  -> {..., name: feats}
    concat label                     -> {op: concat, input: label}   (joins a condition input here)
    concat feats                     -> {op: concat, input: feats}   (or the output of the earlier row `as feats`)
    add h                            -> {op: add, input: h}          (adds the output of the earlier row `as h`)
    block res ch=64 stride=2         -> {op: block, block: res, args: {ch: 64, stride: 2}}   (blocks.py expands it)

A row may also be written as the canonical mapping itself. Every problem raises RowError
with a message that says what was expected.
"""

from __future__ import annotations

import math
import re

from genspec.errors import suggest
from genspec.lang import plugins
from genspec.lang.registry import ACTIVATIONS, LAYER_OPS, NORMS, ROW_KEYS, SPECTRAL_NORM_OPS, UPSAMPLE_MODES


class RowError(ValueError):
    pass


_INT = re.compile(r"^\d{1,9}$")  # sizes; longer digit strings are no layer size
_FLOAT = re.compile(r"^[-+]?(\d{1,30}\.?\d{0,30}|\.\d{1,30})([eE][-+]?\d{1,3})?$")
_DIMS = re.compile(r"^\d{1,9}(x\d{1,9})+$")
_STRIDE = re.compile(r"^/(\d{1,9})$")
_SCALE = re.compile(r"^x(\d{1,9})$")
_OPTION = re.compile(r"^([a-z_]+)=(\S+)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAP = re.compile(r"\s+as\s+(\S+)\s*$")
_ARGUMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\S+)$")  # a block param's value: block res ch=64
_WORD = re.compile(r"^[A-Za-z0-9_.+-]+$")  # a param value that is not a number: act=lrelu

_ARTICLE = {"norm": "a norm", "act": "an activation", "dropout": "a dropout"}

# Post-ops that close a row, in the order they apply.
_POST_ORDER = {"norm": 0, "act": 1, "dropout": 2}


_HUGE = re.compile(r"^[x/]?(\d+(x\d+)*)$")


def _refuse_huge_numbers(tokens: list[str]) -> None:
    """`fc 1000000000`: a size past the grammar's nine digits is too large, not a syntax error."""
    for token in tokens[1:]:
        match = _HUGE.match(token)
        if match and any(len(n) > 9 for n in match.group(1).split("x")):
            raise RowError(f"{token!r}: a layer size, kernel or stride is at most 999,999,999; this one is too large")


def parse_row(row) -> dict:
    """A row (string or mapping) -> its canonical mapping."""
    if isinstance(row, dict):
        return _check_mapping(row)
    if not isinstance(row, str):
        raise RowError(f"a row is a string like 'conv 64 5x5 /2, bn, relu' or a mapping, not {type(row).__name__}")
    text = row.strip()
    if not text:
        raise RowError("empty row")
    out: dict = {}
    tap = _TAP.search(text)
    if tap:
        if not _NAME.match(tap.group(1)):
            raise RowError(f"tap name {tap.group(1)!r} must be a plain name")
        out["name"] = tap.group(1)
        text = text[: tap.start()].rstrip()
        if text.endswith(","):  # `fc 32, relu, as h`: the tap written as a part of its own
            text = text[:-1]
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise RowError("empty part between commas")
    _refuse_huge_numbers(parts[0].split())
    out.update(_parse_main(parts[0].split()))
    if out["op"] == "gaussian" and len(parts) > 1 and any(p.strip() != "frozen" for p in parts[1:]):
        raise RowError("a gaussian head is the network's output: it takes no norm, activation or dropout")
    last = -1
    for part in parts[1:]:
        key, value = _parse_post(part.split())
        if key in ("frozen", "sn"):  # flags, in any place after the layer
            out[key] = True
            continue
        if key in out:
            raise RowError(f"{part!r}: this row already has {_ARTICLE[key]}")
        if _POST_ORDER[key] < last:
            raise RowError(f"{part!r} comes too late: write norm, then activation, then dropout (or split the row)")
        last = _POST_ORDER[key]
        out.update(value)
    if out.get("sn") and out["op"] not in (*SPECTRAL_NORM_OPS, "block"):
        raise RowError(f"'sn' (spectral normalisation of a weight) applies to {', '.join(SPECTRAL_NORM_OPS)} rows "
                       f"and to blocks (their rows of those kinds), not {out['op']!r}")
    return out


def _parse_main(words: list[str]) -> dict:
    op, args = words[0], words[1:]
    if op not in LAYER_OPS and op not in plugins.LAYERS:
        known = plugins.layer_ops()
        raise RowError(f"unknown layer {op!r}" + (suggest(op, known) or f"; known: {', '.join(known)}"))
    if op in plugins.LAYERS:
        return _parse_plugin(plugins.LAYERS[op], args)
    if op in ("conv", "deconv"):
        return _parse_conv(op, args)
    if op == "gaussian" and len(args) >= 2 and _DIMS.match(args[1]) and _INT.match(args[0]):
        return _parse_conv_gaussian(args)
    if op in ("fc", "gaussian"):
        return _parse_dense(op, args)
    if op in ("maxpool", "avgpool"):
        stride = None
        if len(args) == 2 and _STRIDE.match(args[1]):
            stride = int(_STRIDE.match(args[1]).group(1))
            args = args[:1]
        size = _one_int(op, args, f"a window and optional stride, e.g. '{op} 2' or '{op} 3 /1'")
        if stride == 0:
            raise RowError(f"{op}: the stride must be positive")
        return {"op": op, "kernel": size, "stride": stride or size}
    if op == "upsample":
        return _parse_upsample(args)
    if op == "dropout":
        return {"op": op, "p": _probability(op, args)}
    if op == "crop":
        return {"op": op, "p": _one_int(op, args, "pixels to remove from each border, e.g. 'crop 2'")}
    if op == "reshape":
        if not args or not all(_INT.match(a) for a in args):
            raise RowError("reshape takes the target shape as integers, e.g. 'reshape 256 8 8'")
        return {"op": op, "shape": [int(a) for a in args]}
    if op == "lrelu":
        return {"op": op, "slope": _slope(args)}
    if op == "concat":
        if len(args) != 1 or not _NAME.match(args[0]):
            raise RowError("concat takes the name of one of the network's condition inputs or of an earlier row's tap, "
                           "e.g. 'concat label'")
        return {"op": op, "input": args[0]}
    if op == "add":
        if len(args) != 1 or not _NAME.match(args[0]):
            raise RowError("add takes the tap name of an earlier row (one written '... as NAME'), e.g. 'add h'")
        return {"op": op, "input": args[0]}
    if op == "block":
        return _parse_block(args)
    if args:
        raise RowError(f"{op} takes no arguments, got {' '.join(args)!r}")
    return {"op": op}


_PLUGIN_OPTION = re.compile(r"^([a-z_][a-z0-9_]*)=(\S+)$")


def _parse_plugin(layer, words: list[str]) -> dict:
    """A plugin's row: its options as values in the order it declares them, or as KEY=VALUE."""
    names, row, position = list(layer.options), {"op": layer.name}, 0
    for word in words:
        match = _PLUGIN_OPTION.match(word)
        if match:
            key, text = match.groups()
            if key not in layer.options:
                raise RowError(f"{layer.name} has no option {key!r}; {_plugin_usage(layer)}")
        elif position < len(names):
            key, text = names[position], word
            position += 1
        else:
            raise RowError(f"unexpected {word!r}: {_plugin_usage(layer)}")
        if key in row:
            raise RowError(f"{layer.name}: option {key} given twice")
        row[key] = _option_value(layer, key, text)
    return _complete_plugin_row(layer, row)


def _plugin_usage(layer) -> str:
    if not layer.options:
        return f"{layer.name} takes no options"
    shown = [f"{k}={_option_text(v)}" if not isinstance(v, type) else f"{k} ({v.__name__}, required)"
             for k, v in layer.options.items()]
    return f"{layer.name} takes, in this order or as KEY=VALUE: {', '.join(shown)}"


def _option_value(layer, key: str, text: str):
    kind = layer.option_type(key)
    if kind is bool:
        return _boolean(text)
    if kind is int:
        if not re.match(r"^-?\d{1,9}$", text):
            raise RowError(f"{layer.name}: {key} is a whole number, got {text!r}")
        return int(text)
    if kind is float:
        if not _FLOAT.match(text):
            raise RowError(f"{layer.name}: {key} is a number, got {text!r}")
        return _finite(text)
    return text


def _complete_plugin_row(layer, row: dict) -> dict:
    missing = [k for k in layer.required() if k not in row]
    if missing:
        raise RowError(f"{layer.name} needs {', '.join(missing)}: {_plugin_usage(layer)}")
    return {**layer.defaults(), **row}


def _option_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _num(value) if isinstance(value, float) else str(value)


def _parse_conv(op: str, args: list[str]) -> dict:
    usage = f"expected '{op} CHANNELS KxK' then optional " + ("'/STRIDE'" if op == "conv" else "'xSCALE'") + ", 'pad N' / 'valid', 'bias=false'"
    if args and not _INT.match(args[0]):
        raise RowError(f"{args[0]!r} is not a number of channels: {usage}")
    if len(args) > 1 and not (_DIMS.match(args[1]) or _INT.match(args[1])):
        raise RowError(f"{args[1]!r} is not a kernel size: {usage}")
    if len(args) < 2:
        raise RowError(usage)
    kernel = [int(k) for k in args[1].split("x")]
    if len(kernel) > 2 or (len(kernel) == 2 and kernel[0] != kernel[1]):
        raise RowError(f"kernel {args[1]!r}: only square kernels (KxK) are supported")
    out = {"op": op, "out": int(args[0]), "kernel": kernel[0], "stride": 1}
    rest = args[2:]
    i = 0
    while i < len(rest):
        word = rest[i]
        if op == "conv" and _STRIDE.match(word):
            out["stride"] = int(_STRIDE.match(word).group(1))
        elif op == "deconv" and _SCALE.match(word):
            out["stride"] = int(_SCALE.match(word).group(1))
        elif word in ("same", "valid"):
            out["padding"] = word
        elif word == "pad" and i + 1 < len(rest) and _INT.match(rest[i + 1]):
            out["padding"] = int(rest[i + 1])
            i += 1
        elif _OPTION.match(word) and _OPTION.match(word).group(1) == "bias":
            out["bias"] = _boolean(_OPTION.match(word).group(2))
        else:
            raise RowError(f"unexpected {word!r}: {usage}")
        i += 1
    if out["out"] < 1 or out["kernel"] < 1 or out["stride"] < 1:
        raise RowError("channels, kernel and stride must be positive")
    return out


def _parse_dense(op: str, args: list[str]) -> dict:
    usage = f"expected '{op} N' or '{op} HxWxC'" + (" and optional 'var=V'" if op == "gaussian" else "") + " and optional 'bias=false'"
    if not args:
        raise RowError(usage)
    if not (_INT.match(args[0]) or _DIMS.match(args[0])):
        raise RowError(f"{args[0]!r} is not a size: {usage}")
    dims = [int(d) for d in args[0].split("x")]
    if any(d < 1 for d in dims):
        raise RowError("sizes must be positive")
    # Papers print HxWxC; torch tensors are CxHxW.
    out: dict = {"op": op, "out": dims[0] if len(dims) == 1 else [dims[-1], *dims[:-1]]}
    for word in args[1:]:
        m = _OPTION.match(word)
        if op == "gaussian" and m and m.group(1) == "var" and _FLOAT.match(m.group(2)) and 0 < float(m.group(2)) < math.inf:
            out["var"] = float(m.group(2))
        elif m and m.group(1) == "bias":
            out["bias"] = _boolean(m.group(2))
        else:
            raise RowError(f"unexpected {word!r}: {usage}")
    return out


def _parse_conv_gaussian(args: list[str]) -> dict:
    """`gaussian 4 3x3 valid var=1e-6`: a convolutional head, its channels split into mean and log-variance."""
    options = [w for w in args if _OPTION.match(w) and _OPTION.match(w).group(1) == "var"]
    row = _parse_conv("conv", [w for w in args if w not in options])
    row["op"] = "gaussian"
    for word in options:
        value = _OPTION.match(word).group(2)
        if not _FLOAT.match(value) or not 0 < float(value) < math.inf:
            raise RowError(f"var must be a positive number, got {value!r}")
        row["var"] = float(value)
    return row


def _parse_block(args: list[str]) -> dict:
    """`block res ch=64 stride=2`: a named block of the blocks section and its params' values."""
    usage = "expected 'block NAME' and its params as NAME=VALUE, e.g. 'block res ch=64'"
    if not args or not _NAME.match(args[0]):
        raise RowError(usage)
    values: dict = {}
    for word in args[1:]:
        match = _ARGUMENT.match(word)
        if not match:
            raise RowError(f"unexpected {word!r}: {usage}")
        key, text = match.groups()
        if key in values:
            raise RowError(f"block {args[0]}: {key} is given twice")
        values[key] = block_argument(text)
    return {"op": "block", "block": args[0], "args": values}


def block_argument(text: str):
    """A block param's value as written in a row: a whole number, a number, or a word (relu)."""
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return _finite(text)
    if _WORD.match(text):
        return text
    raise RowError(f"{text!r} is not a param value: write a number or a plain word such as relu")


def _parse_upsample(args: list[str]) -> dict:
    if not args or not _INT.match(args[0]) or int(args[0]) < 1:
        raise RowError("expected 'upsample SCALE' and optional mode (nearest, bilinear)")
    out = {"op": "upsample", "scale": int(args[0]), "mode": "nearest"}
    for word in args[1:]:
        if word not in UPSAMPLE_MODES:
            raise RowError(f"unknown upsampling mode {word!r}; known: {', '.join(UPSAMPLE_MODES)}")
        out["mode"] = word
    return out


def _parse_post(words: list[str]) -> tuple[str, dict]:
    head, args = words[0], words[1:]
    if head in NORMS and not args:
        return "norm", {"norm": head}
    if head == "lrelu":
        return "act", {"act": "lrelu", "slope": _slope(args)}
    if head in ACTIVATIONS and not args:
        return "act", {"act": head}
    if head == "dropout":
        return "dropout", {"dropout": _probability(head, args)}
    if head in ("frozen", "sn") and not args:
        return head, {}
    raise RowError(f"unexpected {' '.join(words)!r} after the layer; expected a norm ({', '.join(NORMS)}), "
                   f"an activation ({', '.join(ACTIVATIONS)}), 'dropout P', 'frozen', 'sn' or 'as NAME'")


def _one_int(op: str, args: list[str], usage: str) -> int:
    if len(args) != 1 or not _INT.match(args[0]) or int(args[0]) < 1:
        raise RowError(f"{op}: expected {usage}")
    return int(args[0])


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RowError(f"{text!r} is not a finite number")
    return value


def _probability(op: str, args: list[str]) -> float:
    if len(args) != 1 or not _FLOAT.match(args[0]) or not 0 <= float(args[0]) < 1:
        raise RowError(f"{op}: expected a probability in [0, 1), e.g. '{op} 0.3'")
    return _finite(args[0])


def _slope(args: list[str]) -> float:
    if not args:
        return 0.01
    if len(args) != 1 or not _FLOAT.match(args[0]):
        raise RowError("lrelu: expected a negative slope, e.g. 'lrelu 0.2'")
    return _finite(args[0])


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise RowError(f"expected true or false, got {text!r}")


# The keys each op reads, beyond those every row may have (post-ops, a tap name, frozen).
_OP_KEYS = {
    "conv": {"out", "kernel", "stride", "padding", "bias", "sn"},  # sn: spectral normalisation of the weight
    "deconv": {"out", "kernel", "stride", "padding", "bias", "sn"},
    "fc": {"out", "bias", "sn"},
    "gaussian": {"out", "var", "bias", "kernel", "stride", "padding"},  # with a kernel: a convolutional head
    "maxpool": {"kernel", "stride"},
    "avgpool": {"kernel", "stride"},
    "upsample": {"scale", "mode"},
    "dropout": {"p"},
    "crop": {"p"},
    "reshape": {"shape"},
    "concat": {"input"},
    "add": {"input"},
    "block": {"block", "args", "sn"},  # sn: every conv, deconv and fc row of the block
}
_EVERY_ROW_KEYS = {"op", "norm", "act", "dropout", "frozen", "name"}


def _keys_of(row: dict) -> set:
    keys = _EVERY_ROW_KEYS | _OP_KEYS.get(row["op"], set())
    if row["op"] in plugins.LAYERS:
        keys |= set(plugins.LAYERS[row["op"]].options)
    if row["op"] == "lrelu" or row.get("act") == "lrelu":
        keys.add("slope")
    return keys


def _check_mapping(row: dict) -> dict:
    """Light checks of a mapping row; the JSON Schema checks types, shapes.py the sizes."""
    layer = plugins.LAYERS.get(row.get("op")) if isinstance(row.get("op"), str) else None
    options = {k for plugin in plugins.LAYERS.values() for k in plugin.options}  # those of other ops: "does not apply"
    unknown = [k for k in row if k not in ROW_KEYS and k not in options]
    if unknown:
        raise RowError(f"unknown key {unknown[0]!r} in a layer row; known: {', '.join(ROW_KEYS)}")
    if row.get("op") not in LAYER_OPS and layer is None:
        raise RowError(f"a mapping row needs 'op', one of: {', '.join(plugins.layer_ops())}")
    required = {"conv": ("out", "kernel"), "deconv": ("out", "kernel"), "fc": ("out",), "gaussian": ("out",),
                "maxpool": ("kernel",), "avgpool": ("kernel",), "upsample": ("scale",), "dropout": ("p",), "crop": ("p",),
                "reshape": ("shape",), "concat": ("input",), "add": ("input",), "block": ("block",)}.get(row["op"], ())
    missing = [k for k in required if k not in row]
    if missing:
        raise RowError(f"{row['op']} needs {', '.join(missing)}")
    takes = _keys_of(row)
    stray = [k for k in row if k not in takes]
    if stray:  # e.g. a stride on an fc row would otherwise be ignored without a word
        raise RowError(f"{stray[0]!r} does not apply to {row['op']} rows; they take {', '.join(sorted(takes - {'op'}))}")
    out = _complete_plugin_row(layer, dict(row)) if layer else dict(row)
    if out["op"] == "block":
        if not (isinstance(out["block"], str) and _NAME.match(out["block"])):
            raise RowError(f"block: expected the name of a block of the blocks section, got {out['block']!r}")
        out["args"] = _check_block_arguments(out.get("args", {}))
    if out["op"] == "dropout" and not 0 <= out["p"] < 1:
        raise RowError(f"dropout: p must be in [0, 1), got {out['p']}")
    if out["op"] == "crop" and (not isinstance(out["p"], int) or isinstance(out["p"], bool) or out["p"] < 1):
        raise RowError(f"crop: p is a whole number of pixels >= 1, got {out['p']}")
    if out["op"] == "gaussian" and any(k in out for k in ("norm", "act", "dropout")):
        raise RowError("a gaussian head is the network's output: it takes no norm, activation or dropout")
    if out["op"] in ("conv", "deconv"):
        out.setdefault("stride", 1)
    if out["op"] in ("maxpool", "avgpool"):
        out.setdefault("stride", out["kernel"])
    if out["op"] == "upsample":
        out.setdefault("mode", "nearest")
    if out["op"] == "lrelu" or out.get("act") == "lrelu":
        out.setdefault("slope", 0.01)
    return out


def _check_block_arguments(values) -> dict:
    if not isinstance(values, dict):
        raise RowError("args of a block row is a mapping of its params' values, e.g. {ch: 64}")
    for key, value in values.items():
        if not (isinstance(key, str) and _NAME.match(key)):
            raise RowError(f"block param {key!r} must be a plain name")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RowError(f"block param {key}: expected a number or a plain word, got {value!r}")
        if isinstance(value, str):
            block_argument(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise RowError(f"block param {key}: {value!r} is not a finite number")
    return dict(values)


ROW_DEFAULTS = {"bias": True, "frozen": False}


def canonical(row: dict) -> dict:
    """A row with its defaults made explicit, for comparing rows however they were written."""
    out = {**ROW_DEFAULTS, **row}
    if out["op"] in ("conv", "deconv"):
        out.setdefault("padding", "same")
    if out["op"] == "upsample":
        out.setdefault("mode", "nearest")
    return out


def _num(value) -> str:
    from genspec.lang.expr import number_text

    return number_text(value)


def format_row(row: dict) -> str:
    """The canonical mapping back as a compact row, the way a paper's table prints it."""
    op = row["op"]
    words = [op]
    if op in ("conv", "deconv"):
        words += [str(row["out"]), f"{row['kernel']}x{row['kernel']}"]
        if row.get("stride", 1) != 1:
            words.append(("/" if op == "conv" else "x") + str(row["stride"]))
        if "padding" in row:
            words.append(row["padding"] if isinstance(row["padding"], str) else f"pad {row['padding']}")
    elif op == "gaussian" and "kernel" in row:
        words += [str(row["out"]), f"{row['kernel']}x{row['kernel']}"]
        if row.get("stride", 1) != 1:
            words.append(f"/{row['stride']}")
        if "padding" in row:
            words.append(row["padding"] if isinstance(row["padding"], str) else f"pad {row['padding']}")
        if "var" in row:
            words.append(f"var={_num(row['var'])}")
    elif op in ("fc", "gaussian"):
        out = row["out"]
        words.append(str(out) if isinstance(out, int) else "x".join(str(d) for d in [*out[1:], out[0]]))
        if "var" in row:
            words.append(f"var={_num(row['var'])}")
    elif op in ("maxpool", "avgpool"):
        words.append(str(row["kernel"]) + (f" /{row['stride']}" if row.get("stride", row["kernel"]) != row["kernel"] else ""))
    elif op == "upsample":
        words.append(str(row["scale"]) + ("" if row.get("mode", "nearest") == "nearest" else f" {row['mode']}"))
    elif op in ("dropout", "crop"):
        words.append(_num(row["p"]))
    elif op == "reshape":
        words += [str(d) for d in row["shape"]]
    elif op == "lrelu":
        words.append(_num(row["slope"]))
    elif op in ("concat", "add"):
        words.append(row["input"])
    elif op == "block":
        words.append(row["block"])
        # a float keeps its point (2.0, not 2), so that it parses back as the float it is
        words += [f"{k}={v if isinstance(v, (str, int)) else repr(float(v))}" for k, v in row.get("args", {}).items()]
    elif op in plugins.LAYERS:  # the options that differ from their defaults
        layer = plugins.LAYERS[op]
        words += [f"{k}={_option_text(row[k])}" for k, default in layer.options.items()
                  if k in row and (isinstance(default, type) or row[k] != default)]
    if row.get("bias") is False:
        words.append("bias=false")
    parts = [" ".join(words)]
    if row.get("norm"):
        parts.append(row["norm"])
    if row.get("act"):
        parts.append(row["act"] + (f" {_num(row['slope'])}" if row["act"] == "lrelu" else ""))
    if "dropout" in row:
        parts.append(f"dropout {_num(row['dropout'])}")
    if row.get("frozen"):
        parts.append("frozen")
    if row.get("sn"):
        parts.append("sn")
    text = ", ".join(parts)
    return text + (f"  as {row['name']}" if row.get("name") else "")
