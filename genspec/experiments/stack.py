"""Many small models at once: the seeds of one study configuration trained as one stacked model.

Replicas of a spec share its architecture, so their parameters stack along a leading model
dimension (`torch.func.stack_module_state`) and each phase's step runs once for all of them
(`torch.func.vmap` over `functional_call`, with different random draws per replica). Each
objective's loss is summed over replicas before its backward pass: the gradient of a replica's
slice is exactly that replica's own gradient. One optimiser per objective then updates the
stacked tensors; Adam, AdamW, RMSprop and SGD act elementwise, so this is K independent
optimisers. Buffers stack the same way and go into every vmapped call with in_dims 0: batch
norm normalises each replica's slice with its own batch statistics and updates its own running
statistics in place in the stacked buffers (`unstack` copies them back for evaluation), and
virtual batch norm reads each replica's own reference batch. Every replica keeps its own seed,
data split, shuffles and noise, and its folder is written as a sequential run writes it
(metrics.jsonl, checkpoint with its own optimiser state and running statistics, report, its own
TensorBoard / MLflow run), so the
results are those of separate runs up to float rounding and random draws.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
import yaml
from torch.func import functional_call, stack_module_state, vmap

from genspec.compiler.cuda_graphs import StepGraphs
from genspec.compiler.model import Env, Model, choose_device, make_optimizer
from genspec.data.datasets import Splits, batch_starts, batches, load_data
from genspec.errors import RunError
from genspec.lang import expr as E
from genspec.lang.spec import Spec
from genspec.measure.balance import Balancer
from genspec.measure.evaluate import EVAL_SEED, evaluated_losses, final_evaluation, forked_rng
from genspec.measure.sampling import graph_samples
from genspec.report import tracking
from genspec.report.run_report import write_layer_tables, write_report
from genspec.train import trace as step_trace
from genspec.train.checkpoint import save_checkpoint
from genspec.train.folder import RESOLVED, append_record, atomic_write_text, write_manifest, write_metrics
from genspec.train.loop import (add_losses, after_checks, count_updates, epoch_steps, phase_cycle, phase_networks,
                                torch_failures_as_messages)

NEXT = "next_state/"  # a phase's output: a state's unclamped next value, stored after the step


def _penalties(node):
    """Every `gp(critic, real, fake)` call in an expression."""
    if isinstance(node, E.Call):
        if node.func == "gp":
            yield node
        for arg in node.args:
            yield from _penalties(arg)
    elif isinstance(node, E.BinOp):
        yield from _penalties(node.left)
        yield from _penalties(node.right)
    elif isinstance(node, E.Neg):
        yield from _penalties(node.operand)


def cannot_stack(spec: Spec) -> str | None:
    """Why this spec's replicas cannot train as one stacked model, or None."""
    normalised = [name for name, net in spec.networks.items() if any(info.row.get("sn") for info in net.info.walk())]
    if normalised:  # spectral_norm's power iteration updates its vectors in place, outside what vmap stacks
        return f"network {normalised[0]!r} has spectrally normalised rows, which the stacked step does not support"
    clipped = [name for name, o in spec.objectives.items() if o.clip]
    if clipped:  # the stacked loop fires no training hooks, and clipping is one
        return f"objective {clipped[0]!r} clips its weights after each step, which the stacked step does not do"
    expressions = [*spec.graph.values(), *spec.losses.values(), *(o.minimize for o in spec.objectives.values())]
    for critic in sorted({node.args[0].id for expression in expressions for node in _penalties(expression)}):
        # a frozen row's batch norm runs in eval mode (TableNet.train): it writes no statistics
        if any("bn" in (info.row.get("op"), info.row.get("norm")) and not info.frozen
               for info in spec.networks[critic].info.walk()):
            return (f"the gradient penalty's critic {critic!r} has batch norm, whose running statistics "
                    "cannot be updated inside the penalty's vjp")
    return None


class _Phase(nn.Module):
    """One replica's phase step as a module call: the objectives' losses, the logged losses and
    each state's next value (unclamped; `StackedRuns.step` clamps and stores it after the update,
    as `Model.update_states` does, from the same detached losses)."""

    def __init__(self, model: Model, plan):
        super().__init__()
        self.model, self.plan = model, plan
        self.networks, self.priors, self.states = model.networks, model.priors, model.states

    def forward(self, x, y):
        env = self.model.compute(Env(x, y, functional=True), self.plan.nodes)
        out = {f"objective/{name}": torch.as_tensor(self.model.objectives[name].loss(env)) for name in self.plan.objectives}
        out.update({name: env[f"loss:{name}"] for name in self.plan.loss_names})
        with torch.no_grad():
            out.update({f"{NEXT}{name}": torch.as_tensor(fn(env)) for name, fn in self.plan.state_updates})
        return out


class _Evaluation(nn.Module):
    """One replica's evaluation of a test batch as a module call: the evaluated losses."""

    def __init__(self, model: Model, nodes: list, names: list[str]):
        super().__init__()
        self.model, self.nodes, self.names = model, nodes, names
        self.networks, self.priors, self.states = model.networks, model.priors, model.states

    def forward(self, x, y):
        env = self.model.compute(Env(x, y, functional=True), self.nodes)
        return {name: env[f"loss:{name}"] for name in self.names}


class StackedRuns:
    """K replicas of one architecture (different seeds), trained together."""

    def __init__(self, specs: list[Spec], device: torch.device):
        self.specs, self.device = specs, device
        self.models, self.splits = [], []
        for spec in specs:
            seed = spec.train["seed"]
            torch.manual_seed(seed)
            splits = load_data(spec.data, seed, spec.train["loader"], spec.train["workers"])
            self.splits.append(Splits(splits.train.to(device), splits.val and splits.val.to(device), splits.test.to(device),
                                      splits.notes))
            torch.manual_seed(seed)  # the same initial weights as a sequential run of this seed
            model = Model(spec, device)
            model.set_references(self.splits[-1].train)  # virtual batch norm's reference batch, as a sequential run sets it
            self.models.append(model)
        # states (BEGAN's k) stack as buffers: each replica reads and updates its own
        holders = [nn.ModuleDict({"networks": m.networks, "priors": m.priors, "states": m.states}) for m in self.models]
        params, self.buffers = stack_module_state(holders)
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items() if self._trainable(holders[0], k)}
        self.frozen = {k: v.detach() for k, v in params.items() if k not in self.params}
        base = self.models[0]
        self.steps = [self._functional(_Phase(base, plan)) for plan in base.phases]
        self.eval_names, nodes = evaluated_losses(specs[0], base)
        self.eval_step = self._functional(_Evaluation(base, nodes, self.eval_names))
        self.optimizers = {}
        for name, obj in specs[0].objectives.items():
            keys = self._objective_keys(holders[0], obj.networks)
            self.optimizers[name] = (keys, make_optimizer(obj.optimizer, obj.optimizer_args, [self.params[k] for k in keys],
                                                          base.fast.fused, base.fast.cuda_graphs))
        # the whole vmapped step replayed from a CUDA graph: under vmap a step dispatches several
        # times the operators of a single run's, so the host, not the GPU, sets its pace
        self.graphs = StepGraphs.for_run(base.fast, specs[0].train, self._step, self._phase_params, device,
                                         base._describe_phase)

    @staticmethod
    def _trainable(holder: nn.Module, key: str) -> bool:
        return dict(holder.named_parameters())[key].requires_grad

    def _objective_keys(self, holder: nn.Module, owners: list[str]) -> list[str]:
        """Stacked parameter names of an objective, in the order its own optimiser lists them."""
        prefixes = [f"networks.{n}." if n in self.specs[0].networks else f"priors.{n}." for n in owners]
        return [k for p in prefixes for k in self.params if k.startswith(p)]

    def _functional(self, module: nn.Module):
        def step(params, frozen, buffers, x, y):
            return functional_call(module, ({**params, **frozen}, buffers), (x, y), strict=False)

        return step

    def _phase_params(self, phase_index: int) -> list:
        return [self.params[k] for name in self.models[0].phases[phase_index].objectives for k in self.optimizers[name][0]]

    def step(self, phase_index: int, xs: torch.Tensor, ys) -> dict:
        """One step of every replica: xs (K, batch, ...), ys (K, batch) or None."""
        if self.graphs is not None:
            return self.graphs(phase_index, xs, ys)
        return self._step(phase_index, xs, ys)

    def _step(self, phase_index: int, xs: torch.Tensor, ys) -> dict:
        batched = vmap(self.steps[phase_index], in_dims=(0, 0, 0, 0, None if ys is None else 0), randomness="different")
        # Float32 whatever train.precision says: under vmap, autocast misses most ops (convolutions
        # and Linear layers with a bias stay float32, a bias-free one turns bfloat16 and then meets
        # batch norm's float32 statistics and fails), so a "bf16" stacked step would be neither.
        with torch.autocast(self.device.type, enabled=False):
            out = batched(self.params, self.frozen, self.buffers, xs, ys)
        plan = self.models[0].phases[phase_index]
        for name in plan.objectives:
            self.optimizers[name][1].zero_grad(set_to_none=True)
        for i, name in enumerate(plan.objectives):
            loss = out[f"objective/{name}"]
            keys = self.optimizers[name][0]
            if loss.requires_grad:
                # the sum over replicas: each slice's gradient is its own replica's
                loss.sum().backward(inputs=[self.params[k] for k in keys], retain_graph=i < len(plan.objectives) - 1)
        for name in plan.objectives:
            self.optimizers[name][1].step()
        self._update_states(out)
        return {k: v.detach() for k, v in out.items()}

    def _update_states(self, out: dict) -> None:
        """Each replica's state takes its next value, clamped to the state's range; logged as
        state/NAME like a single run's `Model.update_states`."""
        with torch.no_grad():
            for key in [k for k in out if k.startswith(NEXT)]:
                name = key[len(NEXT):]
                state, buffer = self.specs[0].states[name], self.buffers[f"states.{name}"]
                buffer.copy_(out.pop(key).to(buffer.dtype).clamp(state.low, state.high))
                out[f"state/{name}"] = buffer.clone()

    def evaluate(self) -> list[dict]:
        """Each replica's test-set means of the evaluated losses (what evaluate_losses gives a
        separate run), every batch of all replicas in one vmapped pass in eval mode: one set of
        kernel launches instead of K. The noise draws differ from a separate run's, as in training;
        the final evaluation of each run is evaluate_losses' own."""
        tests = [s.test for s in self.splits]
        if not self.eval_names or len(tests[0]) == 0:
            return [{} for _ in self.specs]
        y_dim = None if tests[0].y is None else 0
        batched = vmap(self.eval_step, in_dims=(0, 0, 0, 0, y_dim), randomness="different")
        sums, count = {}, 0
        for model in self.models:
            model.train(False)
        with forked_rng(self.models[0]), torch.no_grad():
            torch.manual_seed(EVAL_SEED)
            for parts in zip(*(batches(t, self.specs[0].evaluate["batch_size"], None, training=False) for t in tests)):
                xs = torch.stack([x for x, _ in parts])
                ys = None if y_dim is None else torch.stack([y for _, y in parts])
                out = batched(self.params, self.frozen, self.buffers, xs, ys)
                for name, values in out.items():  # (K,) on the device: read back once, at the end
                    sums[name] = sums.get(name, 0) + values.double() * xs.shape[1]
                count += xs.shape[1]
        for model in self.models:
            model.train(True)
        table = {name: (total / count).tolist() for name, total in sums.items()}
        return [{name: values[r] for name, values in table.items()} for r in range(len(self.specs))]

    def rebalance(self, balancers: list) -> list[dict]:
        """CGAN-MBL's balancing for each replica on its own (unstacked) model, whose new label
        weights then go back into the stacked prior buffers. Returns what each run logs."""
        logs = []
        for r, (spec, model, balancer) in enumerate(zip(self.specs, self.models, balancers)):
            logs.append(balancer.step(lambda n: graph_samples(spec, model, spec.train["balance"]["images"], n)))
            latent = spec.train["balance"]["latent"]
            with torch.no_grad():
                self.buffers[f"priors.{latent}.weights"][r].copy_(model.priors[latent].weights)
        return logs

    def unstack(self) -> None:
        """Write each replica's slice back into its own Model (weights and optimiser state)."""
        with torch.no_grad():
            for r, model in enumerate(self.models):
                named = dict(model.networks.named_parameters(prefix="networks")) | dict(model.priors.named_parameters(prefix="priors"))
                for key, value in {**self.params, **self.frozen}.items():
                    named[key].copy_(value[r])
                buffers = (dict(model.networks.named_buffers(prefix="networks")) | dict(model.priors.named_buffers(prefix="priors"))
                           | dict(model.states.named_buffers(prefix="states")))
                for key, value in self.buffers.items():
                    buffers[key].copy_(value[r])
                for name, (keys, optimizer) in self.optimizers.items():
                    self._slice_optimizer(optimizer, model.objectives[name].optimizer, r)

    @staticmethod
    def _slice_optimizer(stacked, own, r: int) -> None:
        state = stacked.state_dict()
        sliced = {i: {k: (v[r].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
                  for i, s in state["state"].items()}
        own.load_state_dict({"state": sliced, "param_groups": own.state_dict()["param_groups"]})


def train_stacked(specs: list[Spec], folders: list[Path], progress: bool = True) -> list[dict]:
    """Train replicas of one spec (different seeds) at once; each folder ends as a sequential run's."""
    with torch_failures_as_messages(specs[0].train, len(specs)):
        return _train_stacked(specs, folders, progress)


def _train_stacked(specs: list[Spec], folders: list[Path], progress: bool) -> list[dict]:
    # as a sequential run: a missing extractor, grid source or dataset fails before training
    stacked = after_checks(specs[0], lambda: StackedRuns(specs, choose_device(specs[0].train["device"])))
    device = stacked.device
    for spec, folder in zip(specs, folders):
        folder.mkdir(parents=True, exist_ok=True)
        write_layer_tables(spec, folder)
        atomic_write_text(folder / RESOLVED, yaml.safe_dump(spec.raw, sort_keys=False))
    histories = [[] for _ in specs]
    trackers = [tracking.start_tracking(spec, folder, resumed=False, start_epoch=1) for spec, folder in zip(specs, folders)]
    train = specs[0].train
    trace = step_trace.StepTrace(step_trace.trace_keys(specs[0]), device, replicas=len(specs))
    balancers = ([Balancer(spec, model, splits.train) for spec, model, splits in zip(specs, stacked.models, stacked.splits)]
                 if train.get("balance") else None)
    for epoch in range(1, train["epochs"] + 1):
        began = time.perf_counter()
        updates: dict[str, int] = {}
        means = _one_epoch(stacked, epoch, trace, updates)
        seconds = round((time.perf_counter() - began) / len(specs), 4)  # per run, as a sequential study counts it
        stacked.unstack()
        balances = stacked.rebalance(balancers) if balancers and balancers[0].due(epoch) else None
        tests = stacked.evaluate()  # after the label weights changed, as a single run evaluates
        summaries = trace.flush_replicas(folders, epoch)
        for r, (spec, model, folder) in enumerate(zip(specs, stacked.models, folders)):
            record = {"epoch": epoch, "time_s": seconds, "train": means[r], "test": tests[r], "updates": updates}
            if summaries[r]:
                record["trace"] = summaries[r]
            if balances:
                record["balance"] = balances[r]
            histories[r].append(record)
            tracking.log_epoch(trackers[r], spec, model, stacked.splits[r].test, record)
            append_record(folder, record)
            if epoch % train["checkpoint_every"] == 0 or epoch == train["epochs"]:
                save_checkpoint(model, folder, epoch)
        if progress:
            line = "; ".join(f"seed {s.train['seed']}: " + ", ".join(f"{k} {v:.4g}" for k, v in h[-1]["test"].items())
                             for s, h in zip(specs, histories))
            print(f"{specs[0].name} (stacked x{len(specs)}) epoch {epoch}/{train['epochs']}: {line}", file=sys.stderr, flush=True)
    results = []
    for spec, model, splits, folder, history, tracked in zip(specs, stacked.models, stacked.splits, folders, histories,
                                                             trackers):
        metrics = final_evaluation(spec, model, splits, folder, history)
        write_report(spec, folder, metrics, history)
        tracking.log_end(tracked, folder, metrics, spec.train["epochs"])
        write_manifest(folder, [RESOLVED, "layers.md", *metrics.get("grids", {}).values()])
        write_metrics(folder, metrics)
        results.append(metrics)
    return results


def _one_epoch(stacked: StackedRuns, epoch: int, trace: step_trace.StepTrace, updates: dict) -> list[dict]:
    specs, train = stacked.specs, stacked.specs[0].train
    for model in stacked.models:
        model.train(True)
    cycle = phase_cycle(specs[0].phases, epoch)
    if not cycle:
        return [{} for _ in specs]
    # each replica shuffles its own split exactly as a sequential run of its seed does
    orders = [torch.randperm(len(s.train), generator=torch.Generator().manual_seed(spec.train["seed"] * 100_003 + epoch))
              .to(stacked.device) for s, spec in zip(stacked.splits, specs)]
    n, size = len(stacked.splits[0].train), train["batch_size"]
    steps_per_epoch = epoch_steps(train, n)
    networks_of = phase_networks(specs[0])
    sums, count = {}, {}
    for step, start in enumerate(batch_starts(n, size)):  # the batches data.batches gives a single run
        if train.get("max_steps") and step >= train["max_steps"]:
            break
        idx = [order[start:start + size] for order in orders]
        xs = torch.stack([s.train.images(i) for s, i in zip(stacked.splits, idx)])
        ys = None if stacked.splits[0].train.y is None else torch.stack([s.train.y[i] for s, i in zip(stacked.splits, idx)])
        run_step = (epoch - 1) * steps_per_epoch + step  # a single run's step numbers
        out = {}
        for phase in cycle[run_step % len(cycle)]:
            computed = stacked.step(phase, xs, ys)
            add_losses(sums, count, computed)
            count_updates(updates, networks_of[phase])
            out.update(computed)
        trace.record(run_step + 1, out)
    table = {name: (total / count[name]).tolist() for name, total in sums.items()}  # one read-back per epoch
    bad = [(name, v) for name, values in table.items() for v in values if not math.isfinite(v)]
    if bad:
        raise RunError(f"loss {bad[0][0]!r} became {bad[0][1]} in epoch {epoch} of a stacked run; the runs stopped")
    return [{name: values[r] for name, values in table.items()} for r in range(len(specs))]
