"""Stage 5: compile a validated spec into nn.Modules, optimisers and per-phase step plans.

Expressions become small Python closures over an environment of computed tensors (no eval).
A phase's plan computes only the graph nodes its objectives need (networkx ancestors); the
step then back-propagates each objective into its own networks' parameters only
(`backward(inputs=...)`), and steps every optimiser after all gradients exist, so one
forward pass serves several updates (VAE-GAN's Algorithm 1) and no objective moves another
network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from genspec.lang import expr as E
from genspec.lang import plugins
from genspec.errors import RunError
from genspec.graph.dependencies import plan, step_extras, value_of
from genspec.compiler.cuda_graphs import StepGraphs
from genspec.compiler.layers import LOGITS, REFERENCE_BATCH, Gaussian, build_network, sum_last, unfold_samples
from genspec.compiler.ops import FROM_LOGITS, TENSOR_OPS, Bernoulli, SoftLabel, gradient_penalty, kl_monte_carlo, kl_normal
from genspec.compiler.priors import build_prior
from genspec.lang.spec import Spec


class Env(dict):
    """Values computed in one step: inputs, tensors and losses by node id, plus network caches.
    `callers`: network name -> what to call instead of its `forward_taps` in this step (the DDP
    wrapper of a network the step's phase updates, under --nproc); evaluation passes none.
    `functional`: the step runs under torch.func transforms (stacked replicas, genspec/experiments/stack.py)."""

    def __init__(self, x, y=None, callers: dict | None = None, functional: bool = False):
        super().__init__()
        self.callers = callers or {}
        self.functional = functional
        self["input:x"] = x
        if y is not None:
            self["input:y"] = y
        self.batch = x.shape[0]
        self.device = x.device
        self.net_cache: dict = {}
        self.logits: dict = {}  # id of a sigmoid network output -> the logits it came from (kept alive by net_cache)


class Compiler:
    """Turns expression ASTs into closures `fn(env) -> value`."""

    def __init__(self, spec: Spec, networks: nn.ModuleDict, priors: nn.ModuleDict, states: nn.Module):
        self.spec = spec
        self.networks = networks
        self.priors = priors
        self.states = states

    def node_fn(self, kind: str, node):
        return self._compile(node, kind)

    def _dims(self, node, kind: str) -> int:
        """How many dimensions each example's value of `node` has (what a per-example sum covers)."""
        value = value_of(self.spec, node, kind)
        if value is None:
            raise RunError(f"cannot work out the shape of {E.to_text(node)} (validate the spec first)")
        return len(value.shape)

    def _compile(self, node, kind: str):
        if isinstance(node, E.Num):
            value = node.value
            return lambda env: value
        if isinstance(node, E.Name):
            return self._name(node.id, kind)
        if isinstance(node, E.Neg):
            inner = self._compile(node.operand, kind)
            return lambda env: -inner(env)
        if isinstance(node, E.BinOp):
            a, b = self._compile(node.left, kind), self._compile(node.right, kind)
            return {"+": lambda env: a(env) + b(env), "-": lambda env: a(env) - b(env),
                    "*": lambda env: a(env) * b(env), "/": lambda env: a(env) / b(env)}[node.op]
        return self._call(node, kind)

    def _name(self, name: str, kind: str):
        spec = self.spec
        if name == "x":
            return lambda env: env["input:x"]
        if name == "y":
            return lambda env: env["input:y"]
        if name in spec.graph:
            key = f"tensor:{name}"
            return lambda env: env[key]
        if name in spec.params:
            value = float(spec.params[name])
            return lambda env: value
        if name in spec.labels:
            label = SoftLabel(**spec.labels[name])
            return lambda env: label
        if name in spec.states:
            states = self.states
            return lambda env: getattr(states, name)
        key = f"loss:{name}"
        return lambda env: env[key]

    def _call(self, node: E.Call, kind: str):
        net_name, _, tap = node.func.partition(".")
        if net_name in self.spec.networks:
            value = value_of(self.spec, node, kind)
            folds = value is None or value.samples > 0  # only a call on rsample(q, k)'s draws folds them
            return self._network_call(net_name, tap or None, [self._compile(a, kind) for a in node.args], folds)
        if node.func == "onehot":
            return self._onehot(node.args[0], kind)
        if node.func in self._OWN:
            return getattr(self, self._OWN[node.func])(node, kind)
        if node.func == "sample":
            prior = self.priors[node.args[0].id]
            return lambda env: prior.sample(env.batch, env.device)
        if node.func == "kl":
            q = self._compile(node.args[0], kind)
            if self.spec.latents[node.args[0 + 1].id].prior == "normal":
                return lambda env: kl_normal(q(env))
            prior = self.priors[node.args[1].id]
            return lambda env: kl_monte_carlo(q(env), prior)
        if node.func == "gp":
            net = self.networks[node.args[0].id]

            def critic(x):
                # The class's forward, not the instance's: under train.compile the instance's is the
                # compiled one, and compiled graphs refuse the penalty's double backward.
                return type(net).forward_taps(net, x)[None]

            real, fake = self._compile(node.args[1], kind), self._compile(node.args[2], kind)
            return lambda env: gradient_penalty(critic, real(env), fake(env), env.functional)
        if node.func == "bce":
            return self._bce(*[self._compile(a, kind) for a in node.args])
        fn = TENSOR_OPS[node.func] if node.func in TENSOR_OPS else plugins.OPS[node.func].fn
        args = [self._compile(a, kind) for a in node.args]
        if len(args) == 1:
            a0 = args[0]
            return lambda env: fn(a0(env))
        if len(args) == 2:
            a0, a1 = args
            return lambda env: fn(a0(env), a1(env))
        return lambda env: fn(*(a(env) for a in args))

    # ops compiled by a method of their own: they need shapes or modules known when compiling
    _OWN = {"rsample": "_rsample", "sum_per_example": "_per_example", "mean_per_example": "_per_example",
            "log_prob": "_log_prob", "bernoulli": "_bernoulli", "quantize": "_quantize"}

    def _onehot(self, arg, kind: str):
        if isinstance(arg, E.Num) or (isinstance(arg, E.Name) and arg.id in self.spec.params):
            label = int(E.constant(arg, self.spec.params))  # one fixed class for the whole batch
            classes = self.spec.num_classes
            return lambda env: F.one_hot(torch.full((env.batch,), label, device=env.device), classes).float()
        value = value_of(self.spec, arg, kind)
        classes = value.shape[0] if value is not None and value.shape else self.spec.num_classes
        labels = self._compile(arg, kind)
        return lambda env: F.one_hot(labels(env), classes).float()

    def _rsample(self, node: E.Call, kind: str):
        q = self._compile(node.args[0], kind)
        if len(node.args) == 1:
            return lambda env: q(env).rsample()
        k = int(E.constant(node.args[1], self.spec.params))
        return lambda env: q(env).rsample(k)

    def _per_example(self, node: E.Call, kind: str):
        t, dims = self._compile(node.args[0], kind), self._dims(node.args[0], kind)
        reduce = "sum" if node.func == "sum_per_example" else "mean"
        return lambda env: sum_last(t(env), dims, reduce)

    def _log_prob(self, node: E.Call, kind: str):
        dist, value_node = node.args
        value = self._compile(value_node, kind)
        if isinstance(dist, E.Name) and dist.id in self.spec.latents:
            prior, shape = self.priors[dist.id], self.spec.latents[dist.id].shape

            def prior_log_prob(env):
                z = value(env)
                lead = z.shape[: z.dim() - len(shape)]  # (batch,) or (k, batch)
                return prior.log_prob(z.reshape(-1, *shape)).reshape(lead)
            return prior_log_prob
        d, dims = self._compile(dist, kind), self._dims(dist, kind)
        return lambda env: d(env).log_prob(value(env), dims)

    def _bernoulli(self, node: E.Call, kind: str):
        p = self._compile(node.args[0], kind)

        def make(env):
            probs = p(env)
            # a sigmoid network's output itself: its logits give the same distribution, stably
            return Bernoulli(probs, env.logits.get(id(probs)))
        return make

    def _quantize(self, node: E.Call, kind: str):
        z, codebook = self._compile(node.args[0], kind), self.priors[node.args[1].id]
        return lambda env: codebook.quantize(z(env))

    @staticmethod
    def _bce(prediction, target):
        """bce, from the logits where the prediction is a sigmoid network's output itself (the
        graph marks those: graph.bce_from_logits); on the probabilities otherwise."""
        bce, bce_from_logits = TENSOR_OPS["bce"], FROM_LOGITS["bce"]

        def call(env):
            p = prediction(env)
            logits = env.logits.get(id(p)) if torch.is_tensor(p) else None
            return bce(p, target(env)) if logits is None else bce_from_logits(logits, target(env))
        return call

    def _network_call(self, name: str, tap: str | None, args: list, folds: bool = True):
        module = self.networks[name]
        net = self.spec.networks[name]
        input_dims = [len(net.input)] + [len(shape) for shape, _ in net.conditions.values()]

        def call(env):
            inputs = [arg(env) for arg in args]
            key = (name, *map(id, inputs))
            if key not in env.net_cache:
                # One pass gives the final output and every tap: `dis(x)` and `dis.features(x)`
                # share it. The inputs are kept with the outputs so their ids stay unique in the step.
                forward = env.callers.get(name) or module.forward_taps  # its DDP wrapper, when the phase updates it
                flat, k = fold_samples(inputs, input_dims) if folds else (inputs, 0)
                outputs = forward(*flat)
                if k:
                    outputs = {t: v.unfold(k) if isinstance(v, Gaussian) else unfold_samples(v, k) for t, v in outputs.items()}
                env.net_cache[key] = (outputs, inputs)
                if LOGITS in outputs:
                    env.logits[id(outputs[None])] = outputs[LOGITS]
            return env.net_cache[key][0][tap]

        return call


def fold_samples(inputs: list, dims: list[int]) -> tuple[list, int]:
    """A network's inputs with the sample axis of rsample(q, k) folded into the batch: k draws of
    each example run as k examples (an input without the axis is repeated for each draw). Returns
    the inputs and k (0 when no input has the axis)."""
    k = next((t.shape[0] for t, d in zip(inputs, dims) if t.dim() == d + 2), 0)
    if not k:
        return inputs, 0
    folded = []
    for t, d in zip(inputs, dims):
        if t.dim() == d + 1:
            t = t.expand(k, *t.shape)
        folded.append(t.reshape(-1, *t.shape[2:]))
    return folded, k


@dataclass
class ObjectiveRun:
    name: str
    params: list
    loss: object  # closure
    optimizer: torch.optim.Optimizer
    prior_params: list = field(default_factory=list)  # of trainable priors: averaged flat under --nproc
    wrapped: list = field(default_factory=list)  # (network, [(name, param)]) of its DDP-wrapped networks


@dataclass
class PhasePlan:
    objectives: list[str]
    nodes: list[tuple[str, object]]  # (node id, closure) in computation order
    loss_names: list[str] = field(default_factory=list)
    state_updates: list[tuple[str, object]] = field(default_factory=list)  # (state, closure), after the step
    callers: dict = field(default_factory=dict)  # network -> DDP wrapper, for the networks this phase updates


class States(nn.Module):
    """The spec's states as 0-d buffers: on the model's device, and saved in checkpoints."""

    def __init__(self, states: dict):
        super().__init__()
        for name, state in states.items():
            self.register_buffer(name, torch.tensor(float(state.init)))


class Model:
    """Everything a run needs: networks, optimisers and the compiled step of each phase."""

    def __init__(self, spec: Spec, device: torch.device, world=None):
        self.spec = spec
        self.device = device
        self.distributed = world is not None and world.distributed  # average gradients and states over ranks
        self.wrappers: dict[str, nn.Module] = {}  # network -> its DistributedDataParallel wrapper (--nproc)
        self.fast = fast_path(spec.train, device, any(convolves(net) for net in spec.networks.values()), self.distributed)
        self.networks = nn.ModuleDict({name: build_network(net) for name, net in spec.networks.items()}).to(device)
        if self.fast.channels_last:
            for name, net in spec.networks.items():
                if convolves(net):
                    self.networks[name].to(memory_format=torch.channels_last)
        self.priors = nn.ModuleDict({name: build_prior(latent) for name, latent in spec.latents.items()}).to(device)
        self.states = States(spec.states).to(device)
        compiler = Compiler(spec, self.networks, self.priors, self.states)
        self.node_fns = {}
        for node_id, attrs in spec.graph_nx.nodes(data=True):
            if attrs["kind"] in ("tensor", "loss", "update"):
                self.node_fns[node_id] = compiler.node_fn(attrs["kind"], attrs["expr"])
        self.set_references()
        self.objectives = {}
        for name, obj in spec.objectives.items():
            modules = [self.networks[n] if n in self.networks else self.priors[n] for n in obj.networks]
            params = [p for module in modules for p in module.parameters() if p.requires_grad]
            self.objectives[name] = ObjectiveRun(name, params, compiler.node_fn("objective", obj.minimize),
                                                 make_optimizer(obj.optimizer, obj.optimizer_args, params, self.fast.fused,
                                                                self.fast.cuda_graphs))
        if self.fast.compile:
            for module in self.networks.values():
                module.forward_taps = torch.compile(module.forward_taps)
        if self.distributed:
            self._wrap_networks()
        self.phases = [self._phase_plan(phase.update) for phase in spec.phases]
        self.graphs = StepGraphs.for_run(self.fast, spec.train, lambda i, x, y: self.step(self.phases[i], x, y),
                                         self._phase_params, device, self._describe_phase)

    def train_step(self, phase_index: int, x, y=None) -> dict[str, torch.Tensor]:
        """The training loop's step: `step` of phase `phase_index`, replayed from a CUDA graph
        once captured (train.cuda_graphs, genspec/compiler/cuda_graphs.py)."""
        if self.graphs is not None:
            return self.graphs(phase_index, x, y)
        return self.step(self.phases[phase_index], x, y)

    def _phase_params(self, phase_index: int) -> list:
        return [p for name in self.phases[phase_index].objectives for p in self.objectives[name].params]

    def _describe_phase(self, phase_index: int) -> str:
        return f"the step of phase {phase_index + 1} (updating {', '.join(self.phases[phase_index].objectives)})"

    def _wrap_networks(self) -> None:
        """One DistributedDataParallel wrapper per network an objective trains (see distributed.py);
        a network with nothing trainable is not wrapped. A network that objectives of different
        phases train (an adversarial autoencoder's encoder) keeps one wrapper, which each of them
        reduces through: two would each hook its parameters and average every gradient twice.
        Every rank builds them in the same order."""
        from genspec.compiler.distributed import wrap

        for name, obj in self.spec.objectives.items():
            run = self.objectives[name]
            for net in obj.networks:
                if net in self.priors:
                    run.prior_params += [p for p in self.priors[net].parameters() if p.requires_grad]
                    continue
                trainable = [(n, p) for n, p in self.networks[net].named_parameters() if p.requires_grad]
                if trainable:
                    if net not in self.wrappers:
                        self.wrappers[net] = wrap(self.networks[net], self.device)
                    run.wrapped.append((net, trainable))

    def _phase_plan(self, objective_names: list[str]) -> PhasePlan:
        g = self.spec.graph_nx
        order = plan(g, objective_names)
        # traced losses and state updates ride along where the phase computes what they read
        targets = [f"loss:{n}" for n in self.spec.train.get("trace", []) if n in self.spec.losses]
        targets += [f"update:{n}" for n in self.spec.states]
        updates = []
        for target in targets:
            extra = step_extras(g, set(order), target)
            if extra is None:
                continue
            order += [n for n in extra if n not in order]
            if target.startswith("update:"):
                updates.append((target.split(":", 1)[1], self.node_fns[target]))
        nodes = [(n, self.node_fns[n]) for n in order]
        # Through its DDP wrapper only where this phase updates it: elsewhere its reducer is left alone.
        callers = {net: self.wrappers[net] for name in objective_names for net in self.spec.objectives[name].networks
                   if net in self.wrappers}
        return PhasePlan(objective_names, nodes, [n.split(":", 1)[1] for n in order if n.startswith("loss:")], updates,
                         callers)

    def set_references(self, train=None) -> None:
        """Fix the reference batch of every network with virtual batch norm: at construction, draws
        of the latents that feed it; given the training split (when training starts), real images
        and their one-hot labels for inputs x and y. Checkpoints keep the batch."""
        for name, net in self.spec.networks.items():
            module = self.networks[name]
            if not module.has_reference:
                continue
            rows = None
            if train is not None:
                rows = torch.randperm(len(train), device="cpu")[:REFERENCE_BATCH]
            sources = [("input", net.input_source, net.input)] + [(c, src, shape) for c, (shape, src) in net.conditions.items()]
            for slot, (what, source, shape) in enumerate(sources):
                value = self._reference_draw(source, shape, rows, train)
                if value is not None:
                    module.set_reference(slot, value)

    def _reference_draw(self, source, shape, rows, train):
        if train is None and source in self.priors:
            return self.priors[source].sample(REFERENCE_BATCH, self.device)
        if rows is not None and source == "x":
            return train.images(rows)
        if rows is not None and source == "y" and train.y is not None:
            return F.one_hot(train.y[rows.to(train.y.device)], shape[0]).float()
        return None  # keep the construction-time draw

    def compute(self, env: Env, nodes: list[tuple[str, object]]) -> Env:
        for node_id, fn in nodes:
            env[node_id] = fn(env)
        return env

    def step(self, phase: PhasePlan, x, y=None) -> dict[str, torch.Tensor]:
        """One update of the phase's objectives on a batch. Returns the losses it computed (detached)."""
        if self.fast.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # Autocast's cache of weight casts lives and dies inside this block, so a CUDA graph of the
        # step records the casts themselves and a replay makes them afresh from the updated weights
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast.bf16):
            env = self.compute(Env(x, y, phase.callers), phase.nodes)
            values = {name: self.objectives[name].loss(env) for name in phase.objectives}
        runs = [self.objectives[name] for name in phase.objectives]
        for run in runs:
            run.optimizer.zero_grad(set_to_none=True)
        for i, run in enumerate(runs):
            loss = values[run.name]
            if torch.is_tensor(loss) and loss.requires_grad:
                # Gradients flow into this objective's own parameters only; under --nproc the DDP
                # wrappers of its networks average them across ranks during this backward pass.
                loss.backward(inputs=run.params, retain_graph=i < len(runs) - 1)
                if self.distributed:
                    self._after_backward(run)
        for run in runs:
            run.optimizer.step()
        out = {name: env[f"loss:{name}"].detach() for name in phase.loss_names}
        out.update({f"objective/{k}": v.detach() for k, v in values.items() if torch.is_tensor(v)})
        if phase.state_updates:
            out.update(self.update_states(phase, env))
        return out

    def _after_backward(self, run: ObjectiveRun) -> None:
        from genspec.compiler.distributed import average_gradients, check_reached

        for net, params in run.wrapped:
            check_reached(f"objective {run.name!r}", net, params, self.spec)
        average_gradients(run.prior_params)  # a flow prior's parameters: no wrapper holds them

    def update_states(self, phase: PhasePlan, env: Env) -> dict[str, torch.Tensor]:
        """Each state takes its update, computed from this step's (detached) losses, clamped to its range."""
        out = {}
        with torch.no_grad():
            new = {name: fn(env) for name, fn in phase.state_updates}  # all read the values before any update
            for name, value in new.items():
                state = self.spec.states[name]
                buffer = getattr(self.states, name)
                buffer.copy_(torch.as_tensor(value, dtype=buffer.dtype).clamp(state.low, state.high))
            if self.distributed:  # each rank saw its own slice of the batch: the states follow their mean
                from genspec.compiler.distributed import average_tensors

                average_tensors([getattr(self.states, name) for name in new])
            out.update({f"state/{name}": getattr(self.states, name).clone() for name in new})
        return out

    def train(self, mode: bool = True) -> None:
        self.networks.train(mode)
        self.priors.train(mode)

    def state_dict(self) -> dict:
        return {"networks": self.networks.state_dict(), "priors": self.priors.state_dict(), "states": self.states.state_dict(),
                "optimizers": {name: run.optimizer.state_dict() for name, run in self.objectives.items()}}

    def load_state_dict(self, state: dict) -> None:
        mismatch = state_mismatch(self.networks, state.get("networks", {})) or state_mismatch(self.priors, state.get("priors", {}))
        if mismatch:
            raise RunError(f"the checkpoint does not fit this spec: {mismatch}")
        self.networks.load_state_dict(state["networks"])
        self.priors.load_state_dict(state.get("priors", {}))
        self.states.load_state_dict(state.get("states", {}))
        for name, run in self.objectives.items():
            # a checkpoint's groups carry the settings of the run that saved it: `capturable` is this
            # run's own (a CUDA-graph run's checkpoint resumed on the CPU, where capturable is refused)
            capturable = [group.get("capturable", False) for group in run.optimizer.param_groups]
            run.optimizer.load_state_dict(state["optimizers"][name])
            for group, own in zip(run.optimizer.param_groups, capturable):
                if "capturable" in group:
                    group["capturable"] = own
            _match_parameter_layouts(run.optimizer)


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimiser state its parameter's memory layout and its step count PyTorch's
    place. A checkpoint written with channels-last weights (CUDA) and read with contiguous ones
    (CPU), or the other way round, keeps the layout it was saved in; fused Adam then refuses the
    mismatch on CUDA and on CPU silently pairs the wrong elements. And a checkpoint loaded onto
    the GPU puts Adam's `step` there, where a non-fused optimiser reads it back with .item() for
    every parameter in every step (a wait for the device each time): it keeps it on the CPU."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(step_count_device(group, param.device))


def step_count_device(group: dict, param_device: torch.device) -> torch.device:
    """Where PyTorch keeps an optimiser's step count: beside the parameters for fused and
    capturable implementations (their kernels read it there), else on the CPU."""
    return param_device if group.get("fused") or group.get("capturable") else torch.device("cpu")


# Where PyTorch has fused kernels for these optimisers (RMSprop has none).
FUSED_DEVICES = ("cuda", "cpu")
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")
# Those that keep host-side step counts unless told `capturable` (SGD keeps none: it is always capturable).
CAPTURABLE_OPTIMIZERS = ("adam", "adamw", "rmsprop")


def convolves(net) -> bool:
    """Whether a network has convolution rows, which channels-last memory speeds up."""
    return any(r.row["op"] in ("conv", "deconv") for r in net.info.walk())


@dataclass(frozen=True)
class FastPath:
    """The train section's speed switches, resolved for a device (see `fast_path`)."""

    bf16: bool
    channels_last: bool
    fused: bool
    compile: bool
    cuda_graphs: bool = False


def fast_path(train: dict, device: torch.device, convolutional: bool = True, distributed: bool = False) -> FastPath:
    """`auto` means on where it is safe and pays: bfloat16 autocast and channels-last convolutions on
    CUDA (channels-last only where a network convolves: else it is a copy of every batch for
    nothing), float32 and the default layout on CPU, where runs stay deterministic to the bit; fused
    Adam/AdamW/SGD on both (one kernel for the whole update: 3-5x faster than PyTorch's default
    per-tensor loop on CPU, and equal to it up to float rounding); whole steps replayed from CUDA
    graphs on CUDA (genspec/compiler/cuda_graphs.py), except under --nproc (DDP's gradient hooks) and with
    train.compile (torch.compile records graphs of its own)."""
    cuda = device.type == "cuda"
    precision = train.get("precision", "auto")
    compiled = bool(train.get("compile", False))
    auto = {"channels_last": cuda and convolutional, "fused": device.type in FUSED_DEVICES}
    pick = {key: auto[key] if train.get(key, "auto") == "auto" else bool(train[key]) for key in auto}
    graphs = train.get("cuda_graphs", "auto") is not False and cuda and not distributed and not compiled
    return FastPath(bf16=precision == "bf16" or (precision == "auto" and cuda), channels_last=pick["channels_last"],
                    fused=pick["fused"], compile=compiled, cuda_graphs=graphs)


def make_optimizer(name: str, args: dict, params: list, fused: bool = False, capturable: bool = False) -> torch.optim.Optimizer:
    kwargs = dict(args)
    if fused and name in FUSED_OPTIMIZERS and params:
        kwargs["fused"] = True  # one kernel for the whole update instead of several per tensor
    if capturable and name in CAPTURABLE_OPTIMIZERS:
        kwargs["capturable"] = True  # step counts on the device, so that a CUDA graph can hold the update
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if "nesterov" in kwargs:
        kwargs["nesterov"] = bool(kwargs["nesterov"])
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}[name]
    return cls(params, **kwargs)


def build(spec: Spec, device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    """The spec's networks as nn.Modules, by name (initialised, frozen rows frozen)."""
    return {name: build_network(net).to(device) for name, net in spec.networks.items()}


def choose_device(setting: str = "auto") -> torch.device:
    """train.device: auto takes the GPU when there is one. Asking for a GPU this machine lacks is
    a RunError, raised here rather than as torch's error at the first tensor moved."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"train.device is {setting}, but torch sees no CUDA GPU here; use train.device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(f"train.device is {setting}, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


__all__ = ["Model", "Env", "Gaussian", "build", "choose_device", "make_optimizer"]


def state_mismatch(modules: nn.ModuleDict, saved: dict) -> str | None:
    """The first tensor where a checkpoint and the spec's modules disagree, in words (None if they
    agree): a checkpoint of another spec, or of this spec before its layers changed, would
    otherwise end in torch's `size mismatch` traceback."""
    own = modules.state_dict()
    for key, tensor in own.items():
        network, _, name = key.partition(".")
        if key not in saved:
            return f"network {network}: its tensor {name} is not in the checkpoint"
        if tuple(saved[key].shape) != tuple(tensor.shape):
            return (f"network {network}: tensor {name} is {'x'.join(map(str, saved[key].shape)) or 'a scalar'} in the "
                    f"checkpoint but {'x'.join(map(str, tensor.shape)) or 'a scalar'} in the spec")
    extra = [key for key in saved if key not in own]
    if extra:
        network, _, name = extra[0].partition(".")
        return f"network {network}: the checkpoint has a tensor {name} that the spec's network does not"
    return None
