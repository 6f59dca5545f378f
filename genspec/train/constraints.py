"""Constraints on the weights, applied after the optimiser steps that change them.

`clip` on an objective is WGAN's weight clipping (Arjovsky et al. 2017, Algorithm 1): after each
optimiser step of the objective, every parameter it trains is clamped to [-clip, clip].
"""

from __future__ import annotations

import torch

from genspec.train.hooks import AFTER_STEP, Hook, TrainingRun, register_hook


@register_hook("weight_clip", order=AFTER_STEP)
class WeightClip(Hook):
    """Clamps, after each phase, the parameters of that phase's objectives that have `clip`."""

    def __init__(self, per_phase: list[list[tuple[list[torch.Tensor], float]]]):
        self.per_phase = per_phase  # phase index -> [(parameters, bound)]

    @classmethod
    def attach(cls, run: TrainingRun):
        spec, model = run.spec, run.model
        if not any(o.clip for o in spec.objectives.values()):
            return None
        per_phase = []
        for phase in spec.phases:
            clipped = []
            for name in phase.update:
                objective = spec.objectives[name]
                if objective.clip:
                    params = [p for owner in objective.networks
                              for p in (model.networks[owner] if owner in model.networks else model.priors[owner]).parameters()
                              if p.requires_grad]  # a frozen row is not trained, so not clipped
                    clipped.append((params, float(objective.clip)))
            per_phase.append(clipped)
        return cls(per_phase)

    def after_update(self, run: TrainingRun, phase: int, losses: dict) -> None:
        with torch.no_grad():
            for params, bound in self.per_phase[phase]:
                for p in params:
                    p.clamp_(-bound, bound)
