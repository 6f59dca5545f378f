"""Plugins (genspec/plugins.py): a spec's `plugins:` imports Python modules that register layer
ops, expression ops, priors and hooks; their names are then used as built-ins, and validation
locates their misuse in the YAML. The example plugin (plugins/genspec_example_ops.py, used by
specs/zoo/plugin_example.yaml) is checked against hand computations. The conftest's
plugin_registrations fixture undoes each test's registrations."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch

import genspec
from genspec.errors import RunError, SpecError
from genspec.lang import plugins as registry_of_plugins
from genspec.lang import registry as R
from genspec.plugins import PluginError, isolated, register_layer, register_op, register_prior
from genspec.train.hooks import HOOKS

from spec_helpers import REPO, cli_in_process, problems_of, tiny_digits_vae

EXAMPLE = REPO / "specs" / "zoo" / "plugin_example.yaml"
PLUGIN = "genspec_example_ops"


@pytest.fixture
def on_path(monkeypatch):
    """The example plugin importable from the environment (for spec texts that are not files in the project)."""
    monkeypatch.syspath_prepend(str(REPO / "plugins"))


def vae_with_plugin(tail: str = "", **replace) -> str:
    """The tiny digits VAE naming the example plugin; `replace` maps old text to new."""
    text = tiny_digits_vae("plug", tail).replace("genspec: 1\n", f"genspec: 1\nplugins: [{PLUGIN}]\n")
    for old, new in replace.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------- the example spec

def test_the_example_spec_validates_trains_and_its_hook_holds_the_weights(tmp_path):
    """The shipped spec trains; the plugin's max-norm hook (after every optimiser step) leaves every
    unit's incoming weights within params.max_norm, many of them at the bound itself."""
    bound = 0.5  # below the norm of a freshly initialised row (about 0.58), so the constraint binds
    rc, out, err = cli_in_process("validate", EXAMPLE)
    assert rc == 0, err
    rc, _, err = cli_in_process("run", EXAMPLE, "--out", tmp_path / "run", "--no-progress", "--set", "train.epochs=2",
                                "--set", "data.split.train=256", "--set", f"params.max_norm={bound}",
                                "--set", "evaluate.grids=[]")
    assert rc == 0, err
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["max_norm"] for h in history] == [bound, bound]  # the hook's epoch_end wrote it
    assert history[-1]["train"]["nelbo"] < history[0]["train"]["nelbo"]
    assert all(math.isfinite(v) for v in history[-1]["test"].values())
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]["networks"]
    weights = [v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    assert len(weights) == 4  # enc: its fc and its gaussian head's linear layer; dec: its two fc
    norms = torch.cat([w.norm(dim=1) for w in weights])
    assert norms.max() <= bound + 1e-5
    assert (norms > bound - 1e-4).sum() >= 32  # rescaled to the bound, not merely small


def test_the_hook_attaches_only_to_runs_of_specs_that_name_the_plugin(on_path):
    from genspec.train.hooks import TrainingRun

    with_plugin = genspec.load(EXAMPLE)
    assert with_plugin.plugins == (PLUGIN,)
    hook = HOOKS[f"{PLUGIN}.max_norm"].cls
    assert hook.attach(TrainingRun(with_plugin, None, None, None, None)).bound == 3.0
    without = genspec.load(REPO / "specs" / "quickstart.yaml", ["params.max_norm=1"])
    assert without.plugins == ()
    assert hook.attach(TrainingRun(without, None, None, None, None)) is None


# ---------------------------------------------------------------- the layer op

def test_pixelnorm_rows_match_the_hand_computation(tmp_path, on_path):
    text = vae_with_plugin(**{'layers: [flatten, "fc 16, relu", gaussian 2]':
                              'layers: ["conv 3 3x3", pixelnorm 0.01, flatten, "fc 16, relu", pixelnorm, gaussian 2]'})
    spec = genspec.load(write(tmp_path, "spec.yaml", text))
    rows = spec.networks["enc"].rows
    assert rows[1] == {"op": "pixelnorm", "eps": 0.01} and rows[4] == {"op": "pixelnorm", "eps": 1e-8}
    nets = genspec.build(spec)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    for row, shape_of in ((1, x), (4, x.flatten(1))):
        module = nets["enc"].rows[row]
        got = module(shape_of).numpy()
        a = shape_of.numpy()
        expected = a / np.sqrt((a ** 2).mean(axis=1, keepdims=True) + rows[row]["eps"])
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_pixelnorm_in_a_mapping_row_and_its_located_problems(tmp_path, on_path):
    ok = vae_with_plugin(**{'"fc 16, relu", gaussian 2': '"fc 16, relu", {op: pixelnorm, eps: 0.001}, gaussian 2'})
    assert genspec.load(write(tmp_path, "ok.yaml", ok)).networks["enc"].rows[2] == {"op": "pixelnorm", "eps": 0.001}
    cases = {
        '{op: pixelnorm, eps: x}': "networks.enc.layers[2].eps: expected number, got string 'x'",
        "pixelnorm eps=-1": "networks.enc.layers[2]: pixelnorm: eps must be positive, got -1",
        "pixelnorm tiny=1": "networks.enc.layers[2]: pixelnorm has no option 'tiny'; pixelnorm takes, in this order "
                            "or as KEY=VALUE: eps=1e-08",
        "pixelnorm 1 2": "networks.enc.layers[2]: unexpected '2'",
        "{op: fc, out: 3, eps: 1}": "networks.enc.layers[2]: 'eps' does not apply to fc rows",
    }
    for row, expected in cases.items():
        text = vae_with_plugin(**{'"fc 16, relu", gaussian 2': f'"fc 16, relu", "{row}", gaussian 2'
                                  if not row.startswith("{") else f'"fc 16, relu", {row}, gaussian 2'})
        found = problems_of(text, str(write(tmp_path, "bad.yaml", text)))
        assert len(found) == 1 and expected in found[0], (row, found)
        assert found[0].startswith(f"{tmp_path / 'bad.yaml'}:"), found
    # a shape the plugin refuses: the row is named
    text = vae_with_plugin(**{'layers: [flatten, "fc 16, relu", gaussian 2]': 'layers: [reshape 8 8, pixelnorm, flatten, gaussian 2]'})
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "reshape 8 8, pixelnorm" in t)
    column = text.splitlines()[line - 1].index("pixelnorm") + 1
    assert problems_of(text, str(write(tmp_path, "shape.yaml", text))) == [
        f"{tmp_path / 'shape.yaml'}:{line}:{column}: networks.enc.layers[1]: pixelnorm: normalises the channels of a "
        "flat or CxHxW input, got 8x8"]


# ---------------------------------------------------------------- the expression op

def test_logcosh_in_the_loss_has_the_value_computed_by_hand(on_path):
    from genspec.compiler.model import Env, Model

    spec = genspec.load(EXAMPLE, ["train.device=cpu"])
    torch.manual_seed(0)
    model = Model(spec, torch.device("cpu"))
    model.train(False)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        env = model.compute(Env(x), list(model.node_fns.items()))
    d = (env["tensor:x_rec"] - x).double().numpy().reshape(6, -1)
    expected = 10 * np.log(np.cosh(d)).sum(axis=1).mean()
    assert float(env["loss:rec"]) == pytest.approx(expected, rel=1e-5)
    assert float(env["loss:nelbo"]) == pytest.approx(float(env["loss:rec"]) + float(env["loss:kl"]), rel=1e-6)
    far = torch.full((1, 3), 60.0)  # log(cosh(60)) = 60 - log 2; cosh itself would be 5.7e25, and overflow past 89
    assert float(registry_of_plugins.OPS["logcosh"].fn(far, torch.zeros(1, 3))) == pytest.approx(3 * (60 - math.log(2)))


def test_a_plugin_op_with_the_wrong_arguments_is_located_in_the_spec(tmp_path, on_path):
    text = vae_with_plugin("", **{"rec: sqerr(x_rec, x)": "rec: logcosh(x_rec)"})
    path = write(tmp_path, "args.yaml", text)
    rc, _, err = cli_in_process("validate", path)
    assert rc == 2 and "Traceback" not in err
    line = text.splitlines().index("  rec: logcosh(x_rec)") + 1
    assert f"{path}:{line}:" in err and "losses.rec: logcosh takes 2 argument(s) (tensor, tensor), got 1" in err
    # its tensors must share a shape: the row that made the odd one out is named
    text = vae_with_plugin("", **{"rec: sqerr(x_rec, x)": "rec: logcosh(x_rec, x)",
                                  '"fc 64, sigmoid", reshape 1 8 8': '"fc 64, sigmoid"'})
    found = problems_of(text, str(write(tmp_path, "shape.yaml", text)))
    assert len(found) == 1 and "networks.dec.layers[1]: output 64 does not match 1x8x8 in logcosh (losses.rec)" in found[0]


# ---------------------------------------------------------------- the prior

def test_the_laplace_prior_samples_and_scores_as_the_distribution(on_path):
    from genspec.compiler.priors import build_prior

    spec = genspec.load(EXAMPLE)
    assert spec.latents["z"].prior == "laplace" and spec.latents["z"].prior_args == (1.0,)
    assert not spec.latents["z"].trainable
    torch.manual_seed(0)
    prior = build_prior(spec.latents["z"])
    z = prior.sample(40000, "cpu")
    assert z.shape == (40000, 4)
    assert z.mean().abs() < 0.02 and z.abs().mean() == pytest.approx(1.0, rel=0.02)  # E|z| = scale
    assert z.var() == pytest.approx(2.0, rel=0.03)  # var = 2 scale^2
    point = torch.tensor([[0.5, -1.0, 0.0, 2.0]])
    assert float(prior.log_prob(point)) == pytest.approx(-3.5 - 4 * math.log(2))


def test_a_plugin_priors_arguments_are_checked_where_the_spec_gives_them(tmp_path, on_path):
    for prior, message in (("laplace(-1)", "latent.z.prior: laplace: the scale must be a positive number, got -1"),
                           ("laplace", "latent.z.prior: laplace takes 1 argument(s) (scale), got 0"),
                           ("lapalce(1)", "latent.z.prior: 'lapalce(1)' is not allowed here")):
        text = vae_with_plugin(**{"z: {shape: [2], prior: normal}": f"z: {{shape: [2], prior: {prior!r}}}"})
        found = problems_of(text, str(write(tmp_path, "prior.yaml", text)))
        assert len(found) == 1 and message in found[0], found
        assert found[0].startswith(f"{tmp_path / 'prior.yaml'}:6:"), found


# ---------------------------------------------------------------- loading, and what is refused

def test_an_unknown_plugin_module_is_a_located_error(tmp_path):
    path = write(tmp_path, "spec.yaml", vae_with_plugin().replace(f"plugins: [{PLUGIN}]", "plugins: [nowhere_to_be_found]"))
    rc, _, err = cli_in_process("validate", path)
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(f"{path}:2:11: plugins[0]: no plugin module 'nowhere_to_be_found': looked beside the spec")


def test_a_plugin_that_fails_on_import_is_a_one_line_located_error_and_leaves_nothing_registered(tmp_path):
    write(tmp_path, "broken_ops.py", """\
        from genspec.plugins import register_op
        register_op("half_done", fn=abs, args=("any",), result="same")
        raise RuntimeError("cannot find\\nthe weights")
        """)
    write(tmp_path, "clashing_ops.py", """\
        from genspec.plugins import register_op
        register_op("mse", fn=abs, args=("any",), result="same")
        """)
    text = vae_with_plugin().replace(f"plugins: [{PLUGIN}]", "plugins: [broken_ops, clashing_ops]")
    path = write(tmp_path, "spec.yaml", text)
    rc, _, err = cli_in_process("validate", path)
    assert rc == 2 and "Traceback" not in err
    assert err.splitlines() == [
        f"{path}:2:11: plugins[0]: plugin 'broken_ops' failed to import: RuntimeError: cannot find the weights",
        f"{path}:2:23: plugins[1]: plugin 'clashing_ops': op 'mse' is a built-in of genspec; a plugin names its own "
        "(e.g. a prefix)"]
    assert "half_done" not in R.EXPRESSION_OPS and "half_done" not in registry_of_plugins.OPS
    assert "broken_ops" not in sys.modules


def test_names_of_built_ins_and_of_other_plugins_are_refused():
    def shape(row, in_shape):
        return in_shape

    with pytest.raises(PluginError, match="layer op 'conv' is a built-in"):
        register_layer("conv", shape=shape, build=lambda *a: None)
    with pytest.raises(PluginError, match="layer op 'frozen' is a built-in"):
        register_layer("frozen", shape=shape, build=lambda *a: None)
    with pytest.raises(PluginError, match="op 'kl' is a built-in"):
        register_op("kl", fn=abs, args=("dist",), result="scalar")
    with pytest.raises(PluginError, match="prior 'realnvp' is a built-in"):
        register_prior("realnvp", build=lambda latent: None)
    with pytest.raises(PluginError, match="each one of tensor, any, number, dist, labels"):
        register_op("my_gp", fn=abs, args=("network", "tensor"), result="scalar")
    with pytest.raises(PluginError, match="option 'out' must be a plain lowercase name and not one of the row keys"):
        register_layer("wide", shape=shape, build=lambda *a: None, options={"out": 3})
    register_op("my_abs", fn=abs, args=("any",), result="same")
    register_op("my_abs", fn=abs, args=("any",), result="same")  # the same module again (a reload): replaced
    assert registry_of_plugins.OPS["my_abs"].module == "test_plugins"


def test_a_name_another_plugin_registered_is_refused(tmp_path):
    register_op("my_abs", fn=abs, args=("any",), result="same")
    write(tmp_path, "another_plugin.py", """\
        from genspec.plugins import register_op
        register_op("my_abs", fn=abs, args=("any",), result="same")
        """)
    spec = write(tmp_path, "spec.yaml", "genspec: 1\n")
    with pytest.raises(PluginError, match="plugin 'another_plugin': op 'my_abs' is already registered by plugin test_plugins"):
        registry_of_plugins.load_module("another_plugin", str(spec))


def test_plugins_named_by_entry_points_are_loaded_by_name(tmp_path, monkeypatch):
    """A `genspec.plugins` entry point names a module (`name = module`) or a function to call
    (`name = module:function`); a spec names the entry point."""
    write(tmp_path, "installed_ops.py", """\
        from genspec.plugins import register_op
        register_op("twice", fn=lambda a: 2 * a, args=("any",), result="same")
        """)
    write(tmp_path, "installed_setup.py", """\
        from genspec.plugins import register_op

        def setup():
            register_op("thrice", fn=lambda a: 3 * a, args=("any",), result="same")
        """)
    info = tmp_path / "installed_ops-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: installed-ops\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[genspec.plugins]\nshort = installed_ops\nsetup = installed_setup:setup\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = (tiny_digits_vae("ep").replace("genspec: 1\n", "genspec: 1\nplugins: [short, setup]\n")
            .replace("nelbo: rec + kl", "nelbo: twice(rec) + thrice(kl)"))
    spec = genspec.load(write(tmp_path / "..", "ep.yaml", text))
    assert spec.plugins == ("installed_ops", "installed_setup")
    assert R.EXPRESSION_OPS["twice"]["plugin"] == "installed_ops"
    assert registry_of_plugins.OPS["thrice"].fn(1.5) == 4.5


def test_registrations_are_undone_on_leaving_isolated(on_path):
    from genspec.plugins import Hook, register_hook

    names = set(R.EXPRESSION_OPS), set(R.PRIORS), set(HOOKS)
    with isolated():
        spec = genspec.load(EXAMPLE)
        assert {"logcosh"} <= set(R.EXPRESSION_OPS) and "laplace" in R.PRIORS and PLUGIN in sys.modules

        @register_hook("test_plugins.listener")
        class Listener(Hook):
            pass

        assert "test_plugins.listener" in HOOKS
    assert (set(R.EXPRESSION_OPS), set(R.PRIORS), set(HOOKS)) == names
    assert "pixelnorm" not in registry_of_plugins.LAYERS and PLUGIN not in sys.modules
    assert spec.plugins == (PLUGIN,)
    assert genspec.load(EXAMPLE).networks["enc"].rows[2]["op"] == "pixelnorm"  # loading again registers again


def test_a_plugin_layer_whose_module_disagrees_with_its_count_is_refused_at_build():
    register_layer("scaled", shape=lambda row, in_shape: in_shape,
                   build=lambda row, in_shape, out_shape: torch.nn.Linear(in_shape[0], in_shape[0]))
    from spec_helpers import check

    spec = check(tiny_digits_vae("count").replace('"fc 16, relu", gaussian 2', '"fc 16, relu", scaled, gaussian 2'))
    assert spec.networks["enc"].info.rows[2].params == 0
    with pytest.raises(RunError, match=r"plugin layer 'scaled' \(test_plugins\): the module it builds has 272 "
                                       r"parameters, but its params\(\) counts 0"):
        genspec.build(spec)


def test_a_spec_without_plugins_has_none(tmp_path):
    spec = genspec.load(REPO / "specs" / "quickstart.yaml")
    assert spec.plugins == ()
    with pytest.raises(SpecError, match=r"plugins: expected array, got string"):
        genspec.load(write(tmp_path, "s.yaml", tiny_digits_vae("s").replace("genspec: 1\n", "genspec: 1\nplugins: x\n")))
