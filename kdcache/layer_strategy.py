"""The guide's layer-selection strategies (top layers, distributed, bookend) mapped onto a teacher's actual depth.

The guide states each as a list for a 12-layer teacher (LAYER_SELECTION_GUIDE: [-1, -2, -3], [0, 4, 8, 12],
[0, 1, 10, 11]); a 6-layer teacher has no layer 10. Each strategy here is a rule over the depth that gives the
guide's list back at 12 layers. Indices are Hugging Face hidden_states positions: 0 = embeddings, d = last layer."""

from __future__ import annotations

from typing import Optional

STRATEGIES = ("top_layers", "distributed", "bookend")
TOP = 3  # top_layers: the guide's three topmost layers
POINTS = 4  # distributed: the guide's four evenly spaced points, embeddings to last layer


def strategy_layers(strategy: str, depth: int) -> tuple[int, ...]:
    """The hidden_states indices a strategy picks on a teacher of ``depth`` layers (sorted, distinct, within 0..depth).

    - top_layers: the last min(3, depth) layers (never the embeddings);
    - distributed: 4 points evenly spaced from the embeddings (0) to the last layer (depth), rounded;
    - bookend: the two lowest states (embeddings, layer 1) and the two below the last (depth - 2, depth - 1), as
      the guide's [0, 1, 10, 11]: the last layer's output is what the logits already supervise."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"a teacher depth must be an integer >= 1, got {depth!r}")
    if strategy == "top_layers":
        picked = range(max(1, depth - TOP + 1), depth + 1)
    elif strategy == "distributed":
        picked = (int(i * depth / (POINTS - 1) + 0.5) for i in range(POINTS))  # round half up, not to even
    elif strategy == "bookend":
        picked = (0, min(1, depth - 1), max(0, depth - 2), max(0, depth - 1))
    else:
        raise ValueError(f"unknown layer strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    return tuple(sorted(set(picked)))


def teacher_layers(requested: Optional[list[int] | str], depth: int) -> Optional[tuple[int, ...]]:
    """The run's teacher layers on a teacher of ``depth`` layers: a strategy name is mapped onto the depth, a list the
    user named is validated and resolved (kdcache.teacher.LayerError names a layer the teacher lacks); None stays None."""
    if requested is None:
        return None
    if isinstance(requested, str):
        return strategy_layers(requested, depth)
    from kdcache.teacher import resolve_layers

    return resolve_layers(list(requested), depth)
