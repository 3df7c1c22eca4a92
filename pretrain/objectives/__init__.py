"""Objectives: one module each (its nn.Module, config section, sample transform), registered by
`@register_objective`. Importing this package imports every module in it, which registers them.
"""

import importlib
import pkgutil

from pretrain.objectives.registry import (
    OBJECTIVES,
    EmbeddingObjective,
    Exporting,
    Objective,
    ObjectiveEntry,
    PhasedObjective,
    Visualizing,
    build_objective,
    get_objective,
    register_objective,
)

__all__ = [
    "OBJECTIVES",
    "EmbeddingObjective",
    "Exporting",
    "Objective",
    "ObjectiveEntry",
    "PhasedObjective",
    "Visualizing",
    "build_objective",
    "get_objective",
    "register_objective",
]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")
