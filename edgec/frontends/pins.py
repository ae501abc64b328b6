"""The error for an input whose dims are still dynamic, with an --input-shape the user can use."""
from __future__ import annotations

import re

from ..errors import EdgecError


def _dynamic(d) -> bool:
    return not isinstance(d, int) or d < 0      # a zero-size dim is static


def suggested_pin(dims, stored=None) -> tuple[str, list[str]]:
    """An --input-shape value for `dims` (dynamic ones as names, '?' or -1) and the placeholders in it.

    Static dims stay; a dynamic batch (dim 0 of rank >= 2) becomes 1; another dynamic dim takes the value the model
    itself stores for it (`stored`: TFLite keeps a concrete shape beside its signature) when that is more than 1,
    else a placeholder for the user to fill in: H and W for an image's spatial dims, the dim's own name, or Dn.
    Never a 1 for a spatial dim, which no convolutional model accepts."""
    rank = len(dims)
    channel = next((c for c in (1, 3) if rank == 4 and not _dynamic(dims[c])), None)
    spatial = {2: "H", 3: "W"} if channel == 1 else {1: "H", 2: "W"} if channel == 3 else {}
    parts, placeholders = [], []
    for i, d in enumerate(dims):
        if not _dynamic(d):
            parts.append(str(d))
        elif i == 0 and rank >= 2:
            parts.append("1")
        elif stored is not None and int(stored[i]) > 1:
            parts.append(str(int(stored[i])))
        else:
            named = isinstance(d, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,15}", d)
            placeholders.append(spatial.get(i) or (d.upper() if named else f"D{i}"))
            parts.append(placeholders[-1])
    return "x".join(parts), placeholders


def dynamic_dims_error(name: str, dims, stored=None) -> EdgecError:
    example, placeholders = suggested_pin(dims, stored)
    fill = (f" ({', '.join(placeholders)}: the size{'s' if len(placeholders) > 1 else ''} the model expects)"
            if placeholders else "")
    return EdgecError(f"input '{name}' has dynamic dims {list(dims)}",
                      f"pin them with --input-shape {name}:{example}{fill}")
