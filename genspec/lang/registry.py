"""The closed vocabulary of the spec language, as plain data (importable without torch).

The JSON Schema's enums are tested against these tables, so the two never drift, and a
spec can only name what is listed here, or what a plugin it names in `plugins:` registers
(genspec/lang/plugins.py): plugins are the only way Python code enters a spec.
"""

from __future__ import annotations

FORMAT_VERSION = 1

TOP_LEVEL_KEYS = (
    "genspec", "name", "source", "extends", "plugins", "params", "data", "latent", "networks",
    "graph", "losses", "objectives", "train", "evaluate", "tune", "sweep", "repeats", "study", "cluster", "labels", "state",
    "blocks",
)

# Keys of the `cluster:` section: the SLURM resources of each job under `--executor slurm`
# (genspec/experiments/cluster.py); each has a `--slurm-KEY` flag that overrides it.
CLUSTER_KEYS = ("partition", "time", "gpus", "cpus", "mem")

# Activations that may stand as a row of their own or close a row (`conv ..., relu`).
ACTIVATIONS = ("relu", "lrelu", "tanh", "sigmoid", "elu", "gelu", "silu", "softplus", "softmax", "log_softmax")
NORMS = ("bn", "ln", "vbn")  # vbn: virtual batch norm against a reference batch fixed at construction

# Layer ops that may open a row. Activations and norms may also stand alone.
LAYER_OPS = (
    "conv", "deconv", "fc", "gaussian", "maxpool", "avgpool", "upsample", "dropout",
    "flatten", "reshape", "crop", "identity", "concat", "add", "block",
) + NORMS + ACTIVATIONS

# Keys of a canonical row mapping (what every compact row expands to).
ROW_KEYS = (
    "op", "out", "kernel", "stride", "padding", "scale", "mode", "p", "shape", "slope", "var",
    "bias", "norm", "act", "dropout", "frozen", "sn", "name", "input", "block", "args",
)

# How a block's output joins its input (blocks.NAME.skip): add (a residual block), concat (channels).
BLOCK_SKIPS = ("add", "concat")

UPSAMPLE_MODES = ("nearest", "bilinear")

SPECTRAL_NORM_OPS = ("conv", "deconv", "fc")  # the rows whose weight `sn` (spectral_norm) normalises

# Ops callable in graph / loss / objective expressions: argument kinds and result kind.
#   tensor: a batch of values; dist: a distribution (a `gaussian` head's, bernoulli(p), ...); latent: a name in
#   `latent`; scalar: a 0-d loss value; number: a literal or a param; any: tensor or scalar; count: a
#   whole number (a literal or a param); distribution: a dist or a latent's name; value: a tensor or
#   labels. `optional`: how many of the last arguments may be left out. Results: per_example is a
#   tensor of one number per example; broadcast is the tensor of the two (or a number).
EXPRESSION_OPS: dict[str, dict] = {
    "rsample": {"args": ("dist", "count"), "optional": 1, "result": "tensor",
                "doc": "reparameterised draw from a Gaussian head; rsample(q, k): k draws per example, on a leading sample axis"},
    "sample": {"args": ("latent",), "result": "tensor", "doc": "a batch of draws from a latent's prior"},
    "mean_of": {"args": ("dist",), "result": "tensor", "doc": "the mean of a Gaussian head"},
    "kl": {"args": ("dist", "latent"), "result": "scalar", "doc": "KL(q || prior), summed over latent dims, mean over the batch: analytic for a normal prior, a one-draw Monte Carlo estimate for a flow"},
    "sqerr": {"args": ("tensor", "tensor"), "result": "scalar", "doc": "squared error summed per example, mean over the batch"},
    "mse": {"args": ("tensor", "tensor"), "result": "scalar", "doc": "mean squared error over all elements"},
    "l1": {"args": ("tensor", "tensor"), "result": "scalar", "doc": "mean absolute error over all elements"},
    "bce": {"args": ("tensor", "target"), "result": "scalar", "doc": "binary cross-entropy of probabilities against a target (a number, a tensor or a named label), mean"},
    "nll": {"args": ("tensor", "labels"), "result": "scalar", "doc": "negative log-likelihood of class labels under log-probabilities, mean"},
    "mean": {"args": ("any",), "result": "scalar", "doc": "mean of all elements"},
    "sum": {"args": ("any",), "result": "scalar", "doc": "sum of all elements"},
    "abs": {"args": ("any",), "result": "same", "doc": "absolute value"},
    "relu": {"args": ("any",), "result": "same", "doc": "max(a, 0), elementwise (a hinge loss: mean(relu(1 - d)))"},
    "softplus": {"args": ("any",), "result": "same", "doc": "log(1 + exp(a)), elementwise and stable"},
    "exp": {"args": ("any",), "result": "same", "doc": "exponential, elementwise"},
    "log": {"args": ("any",), "result": "same", "doc": "natural logarithm, elementwise"},
    "square": {"args": ("any",), "result": "same", "doc": "a * a, elementwise"},
    "sqrt": {"args": ("any",), "result": "same", "doc": "square root, elementwise"},
    "detach": {"args": ("any",), "result": "same", "doc": "stop gradients (also written x.detach())"},
    "gp": {"args": ("network", "tensor", "tensor"), "result": "scalar",
           "doc": "gradient penalty of a critic: mean (||grad critic(x_hat)|| - 1)^2 at random interpolates of real and fake (WGAN-GP)"},
    "onehot": {"args": ("labels",), "result": "tensor",
               "doc": "class labels (the data's y, argmax(...)) as one-hot vectors (a network's condition input); onehot(7): class 7 for every example"},
    "noisy": {"args": ("tensor", "number"), "result": "same",
              "doc": "noise injection on probabilities: (1 - a) p + a u, u ~ U[0, 1] drawn per element at every step"},
    "l2dist": {"args": ("tensor", "tensor"), "result": "scalar", "doc": "Euclidean distance ||a - b|| per example, mean over the batch"},
    "bce_logits": {"args": ("tensor", "target"), "result": "scalar",
                   "doc": "binary cross-entropy of logits (a network ending without a sigmoid) against a target, mean; stable for any logit"},
    "min": {"args": ("any", "any"), "result": "broadcast", "doc": "the smaller of a and b, elementwise"},
    "max": {"args": ("any", "any"), "result": "broadcast", "doc": "the larger of a and b, elementwise"},
    "clamp": {"args": ("any", "number", "number"), "result": "same", "doc": "a clamped to [low, high], elementwise"},
    "sum_per_example": {"args": ("tensor",), "result": "per_example", "doc": "sum over each example's values: one number per example"},
    "mean_per_example": {"args": ("tensor",), "result": "per_example", "doc": "mean over each example's values: one number per example"},
    "logsumexp": {"args": ("tensor",), "result": "tensor",
                  "doc": "log of the sum of exp over the sample axis of rsample(q, k) (stable): removes that axis"},
    "log_prob": {"args": ("distribution", "value"), "result": "per_example",
                 "doc": "log-density of a value, summed over its dimensions, per example: under a Gaussian head, a latent's prior, bernoulli(p), bernoulli_logits(l) or categorical(logp)"},
    "bernoulli": {"args": ("tensor",), "result": "dist", "doc": "independent Bernoulli distributions with probabilities p (for log_prob); from the logits when p is a sigmoid network's output"},
    "bernoulli_logits": {"args": ("tensor",), "result": "dist", "doc": "independent Bernoulli distributions with logits l (for log_prob)"},
    "categorical": {"args": ("tensor",), "result": "dist", "doc": "a categorical distribution from log-probabilities (a log_softmax output), for log_prob(categorical(logp), y)"},
    "argmax": {"args": ("tensor",), "result": "labels", "doc": "the index of each example's largest value: class labels, for onehot or log_prob"},
    "quantize": {"args": ("tensor", "latent"), "result": "tensor",
                 "doc": "each code vector (the first dimension) replaced by its nearest entry of a codebook latent (VQ-VAE); gradients reach the codebook, not the input"},
}

# Optimisers: name -> keyword arguments they accept (the first positional is lr).
OPTIMIZERS: dict[str, tuple] = {
    "adam": ("lr", "betas", "eps", "weight_decay"),
    "adamw": ("lr", "betas", "eps", "weight_decay"),
    "rmsprop": ("lr", "alpha", "eps", "momentum", "weight_decay"),
    "sgd": ("lr", "momentum", "weight_decay", "nesterov"),
}

# Weight initialisations: name -> positional parameters.
INITS: dict[str, tuple] = {
    "default": (),
    "normal": ("mean", "std"),
    "xavier_uniform": (),
    "xavier_normal": (),
    "kaiming_normal": (),
}

# Latent priors: name -> positional parameters.
PRIORS: dict[str, tuple] = {
    "normal": (),
    "uniform": ("low", "high"),
    "realnvp": (),
    "categorical": (),  # one-hot draws; class weights start uniform (train.balance may shift them)
    "codebook": ("codes",),  # codebook(64): 64 learnable code vectors of the latent's first dimension (VQ-VAE)
}
# Keyword parameters of priors, with their defaults: realnvp(flows=6, hidden=64).
PRIOR_KWARGS: dict[str, dict] = {"realnvp": {"flows": 2, "hidden": 64}}

DATASETS = ("digits", "mnist", "fashion_mnist", "svhn", "celeba", "image_folder")

# Native image shape (channels, height, width) of each built-in dataset.
DATASET_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "svhn": (3, 32, 32)}
DATASET_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "svhn": 10}
# Images in each official pool: one pool (digits: every split drawn from it), or train and test
DATASET_SIZES = {"digits": (1797,), "mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "svhn": (73257, 26032)}
FILE_DATASETS = ("image_folder", "celeba")  # read from image files: held decoded in memory, or streamed
LOADERS = ("auto", "memory", "stream")  # train.loader
TRACKERS = ("tensorboard", "mlflow")  # train.tracking: where runs log their per-epoch numbers and images

FREEZE_MODES = ("all_but_last",)

GRIDS = ("samples", "reconstructions", "interpolations")
