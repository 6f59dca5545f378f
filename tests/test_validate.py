"""Stage 3: the JSON Schema pass and the cross-field pass that builds the Spec."""

from __future__ import annotations

import pytest

from genspec.errors import SpecError
from genspec.lang.loader import load_file
from genspec.graph.pipeline import load_spec
from genspec.lang.spec import Phase
from genspec.lang.validate import validate

from spec_helpers import QUICKSTART, check, problems_of, quickstart_with


def set_problems(*overrides: str) -> list[str]:
    with pytest.raises(SpecError) as exc:
        load_spec(QUICKSTART, list(overrides))
    return [str(p) for p in exc.value.problems]


# ---------------------------------------------------------------- the quick-start

def test_quickstart_builds_the_expected_spec():
    spec = validate(load_file(QUICKSTART))
    assert spec.name == "quickstart"
    assert spec.data_shape == (1, 8, 8) and spec.num_classes == 10
    assert spec.data["split"] == {"train": 1500, "test": 297}
    assert spec.data["labels"] is False and spec.data["pad"] == 0  # defaults filled in
    assert spec.params == {"beta": 1.0, "sigma2": 0.05, "lr": 0.001}
    assert spec.latents["z"].shape == (8,) and spec.latents["z"].prior == "normal"
    enc, dec = spec.networks["enc"], spec.networks["dec"]
    assert enc.input == (1, 8, 8) and dec.input == (8,)
    assert enc.info.kind == "dist" and enc.info.output == (8,)
    assert dec.info.kind == "tensor" and dec.info.output == (1, 8, 8)
    # 64*128+128, 128*64+64, 64*2*8+16 ; 8*64+64, 64*128+128, 128*64+64
    assert [r.params for r in enc.info.rows] == [0, 8320, 8256, 1040]
    assert [r.params for r in dec.info.rows] == [576, 8320, 8256, 0]
    assert (enc.info.trainable, dec.info.trainable) == (17616, 17152)
    vae = spec.objectives["vae"]
    assert vae.networks == ["enc", "dec"] and vae.optimizer == "adam" and vae.optimizer_args == {"lr": 0.001}
    assert spec.phases == [Phase(update=["vae"])]
    # train and evaluate defaults filled in around what the spec sets
    assert (spec.train["device"], spec.train["checkpoint_every"], spec.train["log_every"]) == ("auto", 1, 10)
    assert spec.train["batch_size"] == 64 and spec.train["seed"] == 0
    assert spec.evaluate["grid_size"] == 8 and spec.evaluate["losses"] == ["rec", "kl", "elbo"]
    assert set(spec.graph) == {"q", "z", "x_rec", "x_gen"} and set(spec.losses) == {"rec", "kl", "elbo"}


def test_objective_networks_default_to_its_own_name():
    spec = check(quickstart_with(
        ("  vae: {networks: [enc, dec], minimize: elbo, optimizer: adam(lr)}\n",
         "  enc: {minimize: elbo, optimizer: adam(lr)}\n  dec: {minimize: rec, optimizer: 'sgd(0.1, momentum=0.9)'}\n"),
        ("  grids: [samples, reconstructions, interpolations]\n", "  grids: [samples]\n")))
    assert spec.objectives["enc"].networks == ["enc"]
    assert spec.objectives["dec"].optimizer == "sgd"
    assert spec.objectives["dec"].optimizer_args == {"lr": 0.1, "momentum": 0.9}
    assert spec.phases == [Phase(update=["enc", "dec"])]


def test_optimizer_arguments_are_constants_over_params():
    spec = load_spec(QUICKSTART, ["objectives.vae.optimizer=adam(lr * 2, betas=[0.5, 1 - lr], weight_decay=0)"])
    assert spec.objectives["vae"].optimizer_args == {"lr": 0.002, "betas": [0.5, 0.999], "weight_decay": 0.0}


def test_init_and_prior_arguments():
    spec = load_spec(QUICKSTART, ["networks.enc.init=normal(0, 0.02)", "networks.dec.init=kaiming_normal"])
    assert (spec.networks["enc"].init, spec.networks["enc"].init_args) == ("normal", (0.0, 0.02))
    assert (spec.networks["dec"].init, spec.networks["dec"].init_args) == ("kaiming_normal", ())
    spec = load_spec(QUICKSTART, ["latent.z.prior=uniform(-1, 1)", "losses.kl=mean(z)", "evaluate.grids=[samples]"])
    assert (spec.latents["z"].prior, spec.latents["z"].prior_args) == ("uniform", (-1.0, 1.0))


def test_phases():
    spec = load_spec(QUICKSTART, ["train.phases=[{update: [vae], repeat: 2, epochs: [1, 3]}, {update: [vae]}]"])
    assert spec.phases == [Phase(["vae"], 2, (1, 3)), Phase(["vae"], 1, None)]
    assert spec.phases[0].active(3) and not spec.phases[0].active(4) and spec.phases[1].active(99)


def test_data_shape_follows_pad_image_size_and_image_folder():
    spec = check(quickstart_with(("  dataset: digits    # 1797 images, 1x8x8, pixel values scaled to [0, 1]\n",
                                  "  dataset: image_folder\n  image_size: 6\n  channels: 1\n  pad: 1\n")))
    assert spec.data_shape == (1, 8, 8) and spec.num_classes is None


def test_frozen_network_needs_no_objective():
    spec = check(quickstart_with(("    input: z\n", "    input: z\n    freeze: true\n"),
                                 ("{networks: [enc, dec], minimize: elbo", "{networks: [enc], minimize: elbo")))
    assert spec.networks["dec"].info.trainable == 0 and spec.networks["dec"].info.frozen == 17152


# ---------------------------------------------------------------- schema messages

SCHEMA = [
    ("genspec=2", "--set genspec=2: genspec: must be 1, got 2"),
    ("name=bad name", "--set name=bad name: name: 'bad name' is not allowed here (Run name; reports go to reports/<name>/.)"),
    ("train.epoch=3", "--set train.epoch=3: train.epoch: unknown key 'epoch'; did you mean 'epochs'?"),
    ("data.bogus=1", "--set data.bogus=1: data.bogus: unknown key 'bogus'; known keys: channels, dataset, download, "
                     "image_size, labels, pad, pool, range, root, split"),
    ("data.dataset=cifar10", "--set data.dataset=cifar10: data.dataset: 'cifar10' is not one of \"digits\", \"mnist\", "
                             "\"fashion_mnist\", \"svhn\", \"celeba\", \"image_folder\""),
    ("data.range=[0, 2]", "--set data.range=[0, 2]: data.range: [0, 2] is not one of [0, 1], [-1, 1]"),
    ("latent.z.shape=eight", "--set latent.z.shape=eight: latent.z.shape: expected integer or list, got string 'eight'"),
    ("latent.z={}", "--set latent.z={}: latent.z: missing required key 'shape'"),
    ("latent.z.prior=gamma", "--set latent.z.prior=gamma: latent.z.prior: 'gamma' is not allowed here (normal, uniform(low, high), realnvp(flows=K, hidden=H) (a trainable flow prior), categorical (one-hot draws of shape [classes]), or codebook(K) (K learnable code vectors of the shape's first dimension, for quantize: VQ-VAE).)"),
    ("networks.enc.layers=[]", "--set networks.enc.layers=[]: networks.enc.layers: minItems is 1"),
    ("networks.enc.layers[0]=5", "--set networks.enc.layers[0]=5: networks.enc.layers[0]: expected mapping or string, got integer 5"),
    ("networks.enc.init=orthogonal", "--set networks.enc.init=orthogonal: networks.enc.init: 'orthogonal' is not allowed here "
                                     "(default, normal(mean, std), xavier_uniform, xavier_normal, kaiming_normal.)"),
    ("networks={}", "--set networks={}: networks: minProperties is 1"),
    ("objectives.vae.optimizer=foo(lr)", "--set objectives.vae.optimizer=foo(lr): objectives.vae.optimizer: 'foo(lr)' is not "
                                         "allowed here (adam(lr, betas=[b1, b2]), adamw(...), rmsprop(lr), sgd(lr, momentum=m).)"),
    ("objectives.vae.networks=[enc, enc]", "--set objectives.vae.networks=[enc, enc]: objectives.vae.networks: items must be unique"),
    ("train.batch_size=0", "--set train.batch_size=0: train.batch_size: 0 is out of range (minimum 1)"),
    ("train.device=tpu", "--set train.device=tpu: train.device: 'tpu' is not allowed here"),
    ("evaluate.grid_size=64", "--set evaluate.grid_size=64: evaluate.grid_size: 64 is out of range (maximum 32)"),
    ("params.lr=fast", "--set params.lr=fast: params.lr: expected number, got string 'fast'"),
    ("source=5", "--set source=5: source: expected mapping or string, got integer 5"),
    ("graph.a=[x]", "--set graph.a=[x]: graph.a: expected number or string, got list [\"x\"]"),
]


@pytest.mark.parametrize("override, message", SCHEMA, ids=[o for o, _ in SCHEMA])
def test_schema_problems_are_located_and_readable(override, message):
    assert set_problems(override) == [message]


def test_schema_problems_in_a_file_point_at_the_key(tmp_path):
    text = quickstart_with(("  batch_size: 64\n", "  batch_size: 6.5\n"), ("  seed: 0\n", "  seed: -1\n"))
    line = text.splitlines().index("  batch_size: 6.5") + 1
    assert problems_of(text, "s.yaml") == [f"s.yaml:{line}:3: train.batch_size: expected integer, got number 6.5",
                                           f"s.yaml:{line + 1}:3: train.seed: -1 is out of range (minimum 0)"]


def test_every_schema_problem_is_reported_at_once():
    assert set_problems("train.epochs=0", "evaluate.grid_size=0", "name=a b") == [
        "--set evaluate.grid_size=0: evaluate.grid_size: 0 is out of range (minimum 1)",
        "--set name=a b: name: 'a b' is not allowed here (Run name; reports go to reports/<name>/.)",
        "--set train.epochs=0: train.epochs: 0 is out of range (minimum 1)",
    ]


def test_each_missing_required_key_is_named():
    text = quickstart_with(("name: quickstart\n", ""),
                           ("objectives:\n  vae: {networks: [enc, dec], minimize: elbo, optimizer: adam(lr)}\n", ""))
    messages = [p.split(": ", 2)[2] for p in problems_of(text)]
    assert sorted(messages) == ["missing required key 'name'", "missing required key 'objectives'"]


# a value checked by a oneOf (mapping rows, latent shapes, network inputs, grids, source) hears about the
# alternative of its own kind, at the key or item that is wrong
SCHEMA_WRONG_BRANCH = [
    ("networks.enc.layers[0]={op: conv, out: 8, kernel: 3, bogus: 1}",
     "networks.enc.layers[0].bogus: unknown key 'bogus'; known keys: act, args, bias, block, dropout, frozen, input, kernel, mode, name, "
     "norm, op, out, p, padding, scale, shape, slope, sn, stride, var"),
    ("networks.enc.layers[0]={op: convolution, out: 8, kernel: 3}",
     "networks.enc.layers[0].op: 'convolution' is not one of \"conv\", \"deconv\", \"fc\", \"gaussian\", \"maxpool\", "
     "\"avgpool\", \"upsample\", \"dropout\", \"flatten\", \"reshape\", \"crop\", \"identity\", \"concat\", \"add\", \"block\", \"bn\", \"ln\", \"vbn\", "
     "\"relu\", \"lrelu\", \"tanh\", \"sigmoid\", \"elu\", \"gelu\", \"silu\", \"softplus\", \"softmax\", \"log_softmax\""),
    ("networks.enc.layers[0]={op: dropout, p: -1}", "networks.enc.layers[0].p: -1 is out of range (minimum 0)"),
    ("networks.enc.input=[1, 0]", "networks.enc.input[1]: 0 is out of range (minimum 1)"),
    ("latent.z.shape=0", "latent.z.shape: 0 is out of range (minimum 1)"),
    ("latent.z.shape=[8, 0]", "latent.z.shape[1]: 0 is out of range (minimum 1)"),
    ("evaluate.grids={sample: x_gen}", "evaluate.grids.sample: unknown key 'sample'; did you mean 'samples'?"),
    ("evaluate.grids=[samples, samples]", "evaluate.grids: items must be unique"),
    ("source.papr=x", "source.papr: unknown key 'papr'; did you mean 'paper'?"),
]


@pytest.mark.parametrize("override, message", SCHEMA_WRONG_BRANCH, ids=[o for o, _ in SCHEMA_WRONG_BRANCH])
def test_schema_message_describes_the_alternative_that_was_meant(override, message):
    assert set_problems(override) == [f"--set {override}: {message}"]


# ---------------------------------------------------------------- cross-field messages

CROSS = [
    ("data.dataset=image_folder", "/work/main/specs/quickstart.yaml:{data}:1: data: image_folder needs image_size"),
    ("data.channels=3", "--set data.channels=3: data.channels: digits has 1 channel(s)"),
    ("latent.z.prior=uniform(1, 0)", "--set latent.z.prior=uniform(1, 0): latent.z.prior: uniform(low, high) needs low < high"),
    ("latent.z.prior=uniform(1)", "--set latent.z.prior=uniform(1): latent.z.prior: uniform takes 2 argument(s) (low, high), got 1"),
    ("latent.z.prior=normal(0, 1)", "--set latent.z.prior=normal(0, 1): latent.z.prior: normal takes 0 argument(s) (none), got 2"),
    ("networks.enc.init=normal(0)", "--set networks.enc.init=normal(0): networks.enc.init: normal takes 2 argument(s) (mean, std), got 1"),
    ("networks.enc.init=normal(0, sd)", "--set networks.enc.init=normal(0, sd): networks.enc.init: 'sd' is not a number or a param"),
    ("networks.enc.init=default + 1", "--set networks.enc.init=default + 1: networks.enc.init: expected a name or a call like normal(0, 0.02)"),
    ("networks.enc.input=w", "--set networks.enc.input=w: networks.enc.input: input 'w' is neither a shape, x (the data) nor a latent"),
    ("networks.enc.layers[1]=fc 128 relu", "--set networks.enc.layers[1]=fc 128 relu: networks.enc.layers[1]: unexpected 'relu': "
                                           "expected 'fc N' or 'fc HxWxC' and optional 'bias=false'"),
    ("networks.enc.layers[0]=conv 8 3x3 /2", None),  # valid: 8x4x4 -> fc 128
    ("networks.enc.layers[1]=maxpool 2", "--set networks.enc.layers[1]=maxpool 2: networks.enc.layers[1]: maxpool needs a CxHxW input, got 64"),
    ("objectives.vae.optimizer=adam()", "--set objectives.vae.optimizer=adam(): objectives.vae.optimizer: a learning rate is required, e.g. adam(2e-4)"),
    ("objectives.vae.optimizer=adam(lr, 0.9)", "--set objectives.vae.optimizer=adam(lr, 0.9): objectives.vae.optimizer: only the "
                                               "learning rate is positional; name the others (betas=[0.5, 0.999])"),
    ("objectives.vae.optimizer=adam(lr, momentum=0.9)", "--set objectives.vae.optimizer=adam(lr, momentum=0.9): objectives.vae.optimizer: "
                                                        "adam has no argument 'momentum'; it takes lr, betas, eps, weight_decay"),
    ("objectives.vae.optimizer=adam(lr, betas=[0.5])", "--set objectives.vae.optimizer=adam(lr, betas=[0.5]): objectives.vae.optimizer: "
                                                       "betas is a pair, e.g. betas=[0.5, 0.999]"),
    ("objectives.vae.optimizer=adam(lr / 0)", "--set objectives.vae.optimizer=adam(lr / 0): objectives.vae.optimizer: division by zero"),
    ("objectives.vae.minimize=elbo +", "--set objectives.vae.minimize=elbo +: objectives.vae.minimize: cannot parse 'elbo +': "
                                       "expected a name, a number or '(', found the end (at character 7)"),
    ("train.phases=[{update: [vea]}]", "--set train.phases=[{update: [vea]}]: train.phases[0].update[0]: no objective named 'vea'; "
                                       "did you mean 'vae'?"),
    ("train.phases=[{update: [vae], epochs: [3, 1]}]", "--set train.phases=[{update: [vae], epochs: [3, 1]}]: train.phases[0].epochs: "
                                                        "first epoch after the last"),
    ("train.phases=[{update: [vae], epochs: [300, 400]}]", "--set train.phases=[{update: [vae], epochs: [300, 400]}]: train.phases: "
                                                        "objective 'vae' is updated only in epochs 300-400, after the last epoch "
                                                        "(train.epochs is 100): it would never train"),
    ("train.batch_size=1", None),  # no batch norm in the quickstart: a batch of one trains
    ("evaluate.losses=[rec, foo]", "--set evaluate.losses=[rec, foo]: evaluate.losses[1]: no loss named 'foo'"),
    ("params.enc=1", "--set params.enc=1: params.enc: name 'enc' is already used by networks.enc"),
    ("params.x=1", "--set params.x=1: params.x: name 'x' is already used by the input x"),
    ("losses.q=kl(q, z)", "--set losses.q=kl(q, z): losses.q: name 'q' is already used by graph.q"),
]


@pytest.mark.parametrize("override, message", CROSS, ids=[o for o, _ in CROSS])
def test_cross_field_problems(override, message):
    if message is None:
        load_spec(QUICKSTART, [override])
        return
    lines = QUICKSTART.read_text().splitlines()
    message = message.replace("/work/main/specs/quickstart.yaml", str(QUICKSTART)).replace("{data}", str(lines.index("data:") + 1))
    assert set_problems(override) == [message]


def test_misspelt_network_in_an_objective():
    assert set_problems("objectives.vae.networks=[enc, decoder]") == [
        "--set objectives.vae.networks=[enc, decoder]: objectives.vae.networks[1]: no network named 'decoder' to train; "
        "did you mean 'dec'?",
        f"{QUICKSTART}:{_line('  dec:')}:3: networks.dec: network 'dec' has 17152 trainable parameters but no objective "
        "trains it (add an objective, or `freeze: true`)",
    ]


def test_unknown_key_created_by_an_override_is_located_at_the_override():
    assert set_problems("trian.epochs=3") == ["--set trian.epochs=3: trian: unknown key 'trian'; did you mean 'train'?"]


def test_a_negative_index_override_sets_the_item_counted_from_the_end():
    spec = load_spec(QUICKSTART, ["networks.enc.layers[-2]=fc 32, relu"])
    assert spec.networks["enc"].rows[-2] == {"op": "fc", "out": 32, "act": "relu"}


def test_a_problem_in_a_negative_index_override_is_located_at_the_override():
    (problem,) = set_problems("networks.dec.layers[-1]=bogus 3")
    assert problem.startswith("--set networks.dec.layers[-1]=bogus 3: networks.dec.layers[3]: unknown layer 'bogus'")


def test_all_cross_field_problems_are_reported_together():
    problems = set_problems("networks.enc.layers[1]=fc 128 relu", "networks.dec.layers[0]=fc 0", "params.enc=1")
    assert [p.split(": ")[1] for p in problems] == ["networks.dec.layers[0]", "networks.enc.layers[1]", "params.enc"]


def test_an_objective_does_not_repeat_the_problem_of_a_broken_network():
    problems = set_problems("networks.dec.layers[0]=fc 0")
    assert problems == ["--set networks.dec.layers[0]=fc 0: networks.dec.layers[0]: sizes must be positive"]


def test_an_objective_with_only_frozen_networks_has_nothing_to_train():
    assert set_problems("networks.dec.freeze=true", "networks.enc.freeze=true") == [
        f"{QUICKSTART}:{_line('  vae: {networks')}:9: objectives.vae.networks: "
        "nothing for this objective to train: 'enc', 'dec' are entirely frozen"]


def test_a_frozen_network_beside_a_trainable_one_is_fine():
    spec = load_spec(QUICKSTART, ["networks.enc.freeze=true"])  # the thesis's non-learnable encoder
    assert spec.networks["enc"].info.trainable == 0 and spec.networks["dec"].info.trainable > 0


def _line(prefix: str) -> int:
    return next(i for i, line in enumerate(QUICKSTART.read_text().splitlines(), 1) if line.startswith(prefix))


# ---------------------------------------------------------------- gaps: things validate lets through

def test_a_broken_loss_is_not_also_reported_as_missing():
    problems = problems_of(quickstart_with(("  kl: kl(q, z)\n", "  kl: kl(q, z\n")))
    assert len(problems) == 1 and "losses.kl: cannot parse" in problems[0]


# JSON Schema counts 8.0 as an integer; genspec does not (a layer size or an epoch count is a whole number)
INTEGRAL_FLOATS = [
    ("latent.z.shape=8.0", "latent.z.shape: expected integer or list, got number 8.0"),
    ("latent.z.shape=[8.0]", "latent.z.shape[0]: expected integer, got number 8.0"),
    ("networks.enc.layers[1]={op: fc, out: 128.0, act: relu}",
     "networks.enc.layers[1].out: expected integer or list, got number 128.0"),
    ("train.epochs=2.0", "train.epochs: expected integer, got number 2.0"),
]


@pytest.mark.parametrize("override, message", INTEGRAL_FLOATS, ids=[o for o, _ in INTEGRAL_FLOATS])
def test_integral_floats_in_integer_fields_are_rejected(override, message):
    assert set_problems(override) == [f"--set {override}: {message}"]


# mapping rows get the value checks of compact rows
ROW_GAPS = [
    ("{op: dropout, p: 1.5}", "dropout: p must be in [0, 1), got 1.5"),  # torch refuses p > 1
    ("{op: dropout, p: 1}", "dropout: p must be in [0, 1), got 1"),  # as 'dropout 1' is refused
    ("{op: crop, p: 0}", "crop: p is a whole number of pixels >= 1, got 0"),  # Crop(0) slices x[..., 0:-0] to nothing
    ("{op: crop, p: 1.5}", "crop: p is a whole number of pixels >= 1, got 1.5"),  # no float shapes (1x5.0x5.0)
]


@pytest.mark.parametrize("row, message", ROW_GAPS, ids=[r for r, _ in ROW_GAPS])
def test_mapping_rows_are_checked_like_compact_rows(row, message):
    text = quickstart_with(("      - flatten\n", f"      - {row}\n      - flatten\n"))
    line = text.splitlines().index(f"      - {row}") + 1
    assert problems_of(text) == [f"spec.yaml:{line}:9: networks.enc.layers[0]: {message}"]


GAUSSIAN_POST_OPS = "a gaussian head is the network's output: it takes no norm, activation or dropout"


@pytest.mark.parametrize("post", ["relu", "bn", "dropout 0.5", "frozen, relu"])
def test_gaussian_head_refuses_post_ops(post):
    text = quickstart_with(("      - gaussian 8           # mean and log-variance of q(z|x)\n", f"      - gaussian 8, {post}\n"))
    line = text.splitlines().index(f"      - gaussian 8, {post}") + 1
    assert problems_of(text) == [f"spec.yaml:{line}:9: networks.enc.layers[3]: {GAUSSIAN_POST_OPS}"]


def test_gaussian_head_as_a_mapping_refuses_post_ops():
    text = quickstart_with(("      - gaussian 8           # mean and log-variance of q(z|x)\n",
                            "      - {op: gaussian, out: 8, act: relu}\n"))
    line = text.splitlines().index("      - {op: gaussian, out: 8, act: relu}") + 1
    assert problems_of(text) == [f"spec.yaml:{line}:9: networks.enc.layers[3]: {GAUSSIAN_POST_OPS}"]


def test_gaussian_head_may_be_frozen():
    spec = check(quickstart_with(("      - gaussian 8           # mean and log-variance of q(z|x)\n",
                                  "      - gaussian 8, frozen\n")))
    assert spec.networks["enc"].info.rows[-1].frozen


def test_grid_mapping_must_name_a_graph_tensor():
    text = quickstart_with(("  grids: [samples, reconstructions, interpolations]\n", "  grids: {samples: x_generated}\n"))
    line = text.splitlines().index("  grids: {samples: x_generated}") + 1
    assert problems_of(text) == [f"spec.yaml:{line}:11: evaluate.grids.samples: no graph tensor named 'x_generated'; "
                                 "did you mean 'x_gen'?"]


def test_accuracy_must_name_a_graph_tensor():
    assert set_problems("evaluate.accuracy=nope") == [
        "--set evaluate.accuracy=nope: evaluate.accuracy: no graph tensor named 'nope'"]


def test_a_misspelt_network_in_an_override_is_named_as_such():
    """`--set networks.encc.init=...` makes a new network without a table: the error says which
    network was meant, not that 'encc' lacks input and layers."""
    with pytest.raises(SpecError) as exc:
        load_spec(QUICKSTART, ["networks.encc.init=xavier_normal"])
    messages = [str(p) for p in exc.value.problems]
    assert len(messages) == 1 and messages[0].endswith(
        "networks.encc: no network named 'encc'; did you mean 'enc'? (a new network needs its input and layers)")


def test_an_unquoted_optimiser_inside_braces_gets_the_quoting_hint(tmp_path):
    text = QUICKSTART_TEXT_FOR_FLOW
    for optimizer, expected in (("adam(lr, betas=[0.5, 0.999])", "YAML syntax error"),
                                ("adam(lr, beta=0.5)", "unknown key 'beta=0.5)'")):
        path = tmp_path / "flow.yaml"
        path.write_text(text.replace("OPTIMIZER", optimizer))
        with pytest.raises(SpecError) as exc:
            load_spec(path)
        message = " ".join(str(p) for p in exc.value.problems)
        assert expected in message and 'needs quotes, e.g. optimizer: "adam(lr, betas=[0.5, 0.999])"' in message


QUICKSTART_TEXT_FOR_FLOW = """\
genspec: 1
name: flow
data: {dataset: digits}
latent: {z: {shape: [2]}}
networks:
  dec: {input: z, layers: ["fc 64, sigmoid", reshape 1 8 8]}
graph: {x_fake: dec(sample(z))}
losses: {rec: sqerr(x_fake, x)}
objectives:
  dec: {networks: [dec], minimize: rec, optimizer: OPTIMIZER}
"""


def test_split_sizes_follow_the_pool():
    """pool: all draws every split from MNIST's 70000 images together, pool: train from its 60000."""
    from spec_helpers import REPO

    mnist = REPO / "specs" / "mnist_vae.yaml"
    load_spec(mnist, ["data.pool=all", "data.split={train: 62000, val: 4000, test: 4000}"])
    with pytest.raises(SpecError) as exc:
        load_spec(mnist, ["data.pool=train", "data.split={train: 55000, test: 10000}"])
    assert "asks for 65000 images (55000 train, 0 val, 10000 test) but mnist's training set has 60000" in str(exc.value.problems[0])
    with pytest.raises(SpecError) as exc:  # without train, train takes the rest: val and the default test share
        load_spec(QUICKSTART, ["data.split={val: 1600}"])
    assert "asks for 1899 images (1600 val, 299 test) but digits has 1797" in str(exc.value.problems[0])


def test_a_network_missing_its_layers_is_not_called_misspelt():
    with pytest.raises(SpecError) as exc:
        load_spec(QUICKSTART, ["networks.dec={input: z}"])
    messages = [str(p) for p in exc.value.problems]
    assert any("networks.dec: missing required key 'layers'" in m for m in messages)
    assert not any("no network named" in m for m in messages)


def test_the_quoting_hint_is_left_out_of_unrelated_yaml_errors(tmp_path):
    path = tmp_path / "brace.yaml"
    path.write_text('genspec: 1\nsource: {paper: "Kingma (2014)"\nname: x\n')  # a missing }
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    message = str(exc.value.problems[0])
    assert "YAML syntax error" in message and "needs quotes" not in message


def test_batch_norm_with_a_batch_of_one_is_refused():
    from spec_helpers import REPO

    with pytest.raises(SpecError) as exc:
        load_spec(REPO / "specs" / "larsen_vaegan.yaml", ["train.batch_size=1"])
    assert "train.batch_size: batch norm (in networks.enc) needs at least 2 examples a batch" in str(exc.value.problems[0])
