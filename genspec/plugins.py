"""The plugin API: what a Python module a spec names in `plugins:` calls to extend the language.

    # my_ops.py, beside the spec (or in the project's plugins/ folder, or installed)
    import torch
    from genspec.plugins import register_layer, register_op

    register_op("logcosh", args=("tensor", "tensor"), result="scalar",
                fn=lambda a, b: torch.log(torch.cosh(a - b)).flatten(1).sum(1).mean())

    # spec.yaml
    plugins: [my_ops]
    losses: {rec: logcosh(x_rec, x)}

The same registry the built-ins' lookups read: a plugin's layer ops open rows, its ops are called
in expressions and its priors named by latents exactly as built-ins are, and validation reports
their misuse at the line of the spec that misuses them. Names of built-ins are refused. A plugin
module may import torch; genspec imports it only for a spec that names it.

    register_layer(name, shape=, build=, options=, params=, doc=)   a layer op (a row's first word)
    register_op(name, fn=, args=, result=, doc=)                    an expression op
    register_prior(name, build=, params=, kwargs=, trainable=, check=, parameters=, doc=)
    register_hook(name, order)(HookClass)                           a training hook (train/hooks.py);
        its attach(run) should return None unless `__name__ in run.spec.plugins` (the spec named
        this plugin): once imported, a hook hears every run of the process
    isolated()                                                      undo registrations (tests)

See genspec/lang/plugins.py for each function's arguments, and plugins/genspec_example_ops.py for
a plugin with one of each.
"""

from __future__ import annotations

import contextlib

from genspec.lang.plugins import (ENTRY_POINT_GROUP, LAYERS, OPS, PRIORS, PluginError, load_module, register_layer,
                                  register_op, register_prior, unregister)
from genspec.lang.plugins import isolated as _isolated_registry
from genspec.train.hooks import (AFTER_STEP, BALANCING, CHECKPOINTING, EVALUATION, HOOKS, PROGRESS, REPORTING, TRACING,
                                 Hook, TrainingRun, register_hook)


@contextlib.contextmanager
def isolated():
    """Whatever is registered inside the block (layer ops, ops, priors, hooks; plugin modules loaded)
    is undone on leaving it: a test's plugins do not leak into the next test."""
    hooks = dict(HOOKS)
    with _isolated_registry():
        try:
            yield
        finally:
            for name in [n for n in HOOKS if n not in hooks]:
                if not HOOKS[name].cls.__module__.startswith("genspec."):  # genspec's own, imported late, stay
                    del HOOKS[name]
            HOOKS.update(hooks)


__all__ = ["register_layer", "register_op", "register_prior", "register_hook", "unregister", "isolated", "load_module",
           "Hook", "TrainingRun", "PluginError", "LAYERS", "OPS", "PRIORS", "ENTRY_POINT_GROUP",
           "AFTER_STEP", "BALANCING", "EVALUATION", "TRACING", "CHECKPOINTING", "REPORTING", "PROGRESS"]
