"""``GraphHints``: what a model family tells the analysis passes that its graph cannot.

The passes find the block stack, the attention sites, the timestep and the token axes from the
graph alone, except where a structural reading is ambiguous. Hints name graph inputs by their
forward argument, as Dynamo names placeholders after it (``image_rotary_emb`` names
``l_kwargs_image_rotary_emb_0_``, the first tensor of that argument, but never
``l_kwargs_rotary_emb_``). The family modules of ``hetcache_compile.families`` supply them; the
passes know nothing of families.

>>> hints = GraphHints(text_inputs=("encoder_hidden_states",), token_tables=(("image_rotary_emb", 0),))
>>> hints.is_text("l_kwargs_encoder_hidden_states_"), hints.token_table_dim("l_image_rotary_emb_1_")
(True, 0)
>>> names_argument("l_kwargs_encoder_hidden_states_", "hidden_states")
False
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def names_argument(placeholder: str, argument: str) -> bool:
    """Whether Dynamo named ``placeholder`` after the forward argument ``argument`` (or an element of it).
    In a frame resumed after a diffusers hook's pre-forward (context parallelism) the keyword arguments are
    the second item of the hook's result: ``l_stack0_1_<argument>_``."""
    pattern = rf"l_(kwargs_|stack\d+_1_)?{re.escape(argument)}(_\d+)*_"
    return re.fullmatch(pattern, placeholder, flags=re.IGNORECASE) is not None


@dataclass(frozen=True)
class GraphHints:
    """Inputs a graph's structure cannot classify.

    - ``text_inputs``: prompt embeddings. Never token inputs, always CFG branch keys, even when
      they also feed the token stream (CogVideoX embeds text and video together, then splits).
    - ``token_tables``: ``(argument, token dim)`` of inputs with one row per token that come from
      outside the graph (RoPE tables the pipeline computes): gathered with the tokens.
    - ``frames_first``: the 5-D latents are ``[B, F, C, H, W]`` (CogVideoX), not ``[B, C, F, H, W]``.
    """

    text_inputs: tuple[str, ...] = ()
    token_tables: tuple[tuple[str, int], ...] = ()
    frames_first: bool = False

    def is_text(self, placeholder: str) -> bool:
        return any(names_argument(placeholder, name) for name in self.text_inputs)

    def token_table_dim(self, placeholder: str) -> int | None:
        return next((dim for name, dim in self.token_tables if names_argument(placeholder, name)), None)
