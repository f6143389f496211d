"""``ModelFamily``: what a model family's graph cannot tell the passes, declared once per family."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch.fx as fx

from ..passes.hints import GraphHints


@dataclass(frozen=True)
class MaskChannels:
    """An edit mask carried in the last ``channels`` channels of an input: a 5-D latent video with each
    latent cell's ``pixels_per_cell`` (height x width) mask pixels folded into channels (VACE's control
    video), or, ``packed``, a ``[B, N, C]`` input with one row per token whose last ``channels`` hold
    that token's mask pixels (Flux Fill). Only inputs wider than ``channels`` carry it."""

    input_name: str  # the forward argument (Dynamo names the graph input after it)
    channels: int
    pixels_per_cell: tuple[int, int]
    packed: bool = False


@dataclass(frozen=True)
class PositionIds:
    """A graph input giving each packed token's place: one row per token, ``columns`` its (row, column) on
    the token grid (Flux's ``img_ids``). Read at run time, it gives packed latents their grid back."""

    input_name: str
    columns: tuple[int, int]


@dataclass(frozen=True)
class ModelFamily:
    """A model family: which diffusers modules make it, where its edit mask comes from, its VAE's
    pixels per latent cell (time, height, width: a pixel mask's shape), published coefficients of
    the adaptive schedule's rescaling (``rescale``, by name)."""

    name: str
    modules: tuple[str, ...] = ()  # diffusers module names (``transformer_wan``) its graphs are traced from
    classes: tuple[str, ...] = ()  # or block classes that only it uses, where those live in shared modules (SD3)
    pixel_factors: tuple[int, int, int] = (4, 8, 8)
    mask_input: MaskChannels | None = None
    position_ids: PositionIds | None = None  # packed latents only: where their token grid can be read
    packed_patch: tuple[int, int, int] = (1, 1, 1)  # packed latents only: latent cells a token covers
    rescale_polynomials: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    hints: GraphHints = GraphHints()  # inputs its graphs' structure cannot classify (text, RoPE tables)
    limits: str = ""  # what hetcache cannot do with it yet and why, added to its refusals

    def why(self, refusal: str) -> str:
        """``refusal`` (a pass's one-line reason), with what is known about this family's limits."""
        return f"{refusal} [{self.name}: {self.limits}]" if self.limits else refusal

    def matches(self, gm: fx.GraphModule) -> bool:
        """Whether ``gm`` was traced from a module of this family (or through one of its ``classes``)."""
        modules, classes = traced_modules(gm, classes=True)
        return any(name in self.modules for name in modules) or any(name in self.classes for name in classes)


def traced_modules(gm: fx.GraphModule, classes: bool = False):
    """The (last dotted part of the) Python modules defining the ``nn.Module`` classes ``gm`` was traced
    through; with ``classes``, ``(modules, class names)``."""
    modules, names = set(), set()
    for node in gm.graph.nodes:
        for _path, module_type in node.meta.get("nn_module_stack", {}).values():
            # a class, or its qualified name as a string ("package.module.Class")
            if isinstance(module_type, str):
                module, name = module_type.rsplit(".", 1)
            else:
                module, name = module_type.__module__, module_type.__name__
            modules.add(module.rsplit(".", 1)[-1])
            names.add(name)
    return (modules, names) if classes else modules
