"""Per-example clipping: the reference vmap engine and the fast per-layer engine.

Both return a :class:`ClippedSum` for the same arguments and agree to float rounding.
"""

from jaxdp.clipping import fast, reference
from jaxdp.clipping._common import ClippedSum, clip_factors

__all__ = ["ClippedSum", "clip_factors", "fast", "reference"]
