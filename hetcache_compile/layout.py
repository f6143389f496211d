"""Where the runtime finds what it needs among a graph's positional arguments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from .fingerprint import FingerprintCache
from .instances import instance_position
from .passes import GraphAnalysis
from .passes.graph_utils import output_node, placeholders
from .passes.hints import names_argument
from .passes.token_axis import TokenGrid
from .families import ModelFamily


@dataclass(frozen=True)
class InputLayout:
    """Positions of one graph's arguments, by role (None: the graph has no such input).

    - ``instance``: a parameter, whose identity tells model instances apart;
    - ``timestep``: the diffusion timestep (a run is a sequence of calls whose timestep falls);
    - ``text``: inputs feeding cross-attention keys (CFG branches are told apart by them);
    - ``conditioning``: other user inputs fixed through a run (VACE's control video), and the
      scalar tensors Dynamo made of module attributes (a LoRA adapter's scale): a change starts a
      new run, so nothing computed before it is reused after it;
    - ``latent`` and ``control``: the latent video (5-D, or packed ``[B, N, C]``) and the input carrying
      the edit mask (the family's ``mask_input``: VACE's ``control_hidden_states``, Flux Fill's
      ``hidden_states``);
    - ``position_ids``: packed latents' token positions (the family's ``position_ids``: Flux's ``img_ids``).
    """

    num_outputs: int
    instance: int | None
    timestep: int | None
    text: tuple[int, ...]
    conditioning: tuple[int, ...]
    latent: int | None
    control: int | None
    position_ids: int | None = None

    @classmethod
    def of(cls, gm: fx.GraphModule, example_inputs: Sequence[object], analysis: GraphAnalysis,
           family: ModelFamily) -> InputLayout:
        names = [n.name for n in placeholders(gm.graph)]
        index = {name: i for i, name in enumerate(names)}
        skip = set(analysis.region.stream_sources) | set(analysis.text_inputs) | {analysis.timestep_input}
        grid = analysis.token_grid
        return cls(
            num_outputs=len(output_node(gm.graph).args[0]),
            instance=instance_position(example_inputs),
            timestep=index.get(analysis.timestep_input) if analysis.timestep_input else None,
            text=tuple(index[n] for n in analysis.text_inputs),
            conditioning=tuple(index[n] for n in analysis.user_inputs if n not in skip) + _scalar_attributes(
                names, example_inputs, set(analysis.user_inputs)),
            latent=index[grid.latent_input] if grid is not None else None,
            control=_mask_input_index(names, example_inputs, grid, family),
            position_ids=_position_ids_index(names, grid, family),
        )

    def instance_key(self, args: Sequence[object]) -> torch.Tensor | None:
        return None if self.instance is None else args[self.instance]

    def device(self, args: Sequence[object]) -> torch.device:
        """Where the model runs: the device of its parameter (or of the first tensor argument)."""
        tensor = self.instance_key(args)
        if tensor is None:
            tensor = next(a for a in args if isinstance(a, torch.Tensor))
        return tensor.device

    def timestep_value(self, args: Sequence[object]) -> float | None:
        return None if self.timestep is None else float(args[self.timestep].flatten()[0])

    def branch_key(self, args: Sequence[object], fingerprint: FingerprintCache) -> tuple:
        return tuple(fingerprint(args[i]) for i in self.text)

    def conditioning_key(self, args: Sequence[object], fingerprint: FingerprintCache) -> tuple:
        return tuple(fingerprint(args[i]) for i in self.conditioning if isinstance(args[i], torch.Tensor))


def _scalar_attributes(names: Sequence[str], example_inputs: Sequence[object], user_inputs: set[str]) -> tuple:
    return tuple(i for i, (name, value) in enumerate(zip(names, example_inputs))
                 if name not in user_inputs and isinstance(value, torch.Tensor)
                 and not isinstance(value, torch.nn.Parameter) and value.numel() <= 1)


def _mask_input_index(names: Sequence[str], example_inputs: Sequence[object], grid: TokenGrid | None,
                      family: ModelFamily) -> int | None:
    """Position of the family's mask-carrying input, if any: 5-D and latent-sized with the mask channels,
    or, packed, one row per token and wider than the mask channels."""
    spec = family.mask_input
    if grid is None or spec is None or spec.packed != grid.packed:
        return None
    for i, (name, value) in enumerate(zip(names, example_inputs)):
        if not (names_argument(name, spec.input_name) and isinstance(value, torch.Tensor)):
            continue
        if spec.packed and value.dim() == 3 and value.shape[1] == grid.num_tokens and value.shape[2] > spec.channels:
            return i
        if not spec.packed and value.dim() == 5 and value.shape[1] >= spec.channels \
                and tuple(value.shape[2:]) == grid.latent_shape[2:]:
            return i
    return None


def _position_ids_index(names: Sequence[str], grid: TokenGrid | None, family: ModelFamily) -> int | None:
    spec = family.position_ids
    if grid is None or not grid.packed or spec is None:
        return None
    return next((i for i, name in enumerate(names) if names_argument(name, spec.input_name)), None)
