"""State dicts compared by keys and shapes, and the difference told in one line."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def differences(found: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, ignore_suffix: str = "") -> str:
    """What keeps ``found`` from loading as ``expected``: missing and unexpected keys and shapes, '' if nothing.

    Keys ending in ``ignore_suffix`` are left out on both sides (e.g. BatchNorm's
    ``num_batches_tracked``, which FrozenBatchNorm2d does not have and both load without).
    """

    def kept(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in state.items() if not (ignore_suffix and k.endswith(ignore_suffix))}

    found, expected = kept(found), kept(expected)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        key = reshaped[0]
        shapes = f"{list(found[key].shape)}, expected {list(expected[key].shape)}"
        parts.append(f"{len(reshaped)} of another shape (e.g. {key}: {shapes})")
    return ", ".join(parts)
