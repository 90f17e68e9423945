"""Whether any frame can be `safe` at the current settings: the largest radius the configured robust
model can ever certify, against each `safe` threshold, in words for the node's log and /diagnostics
and for `mixclf-eval certify` (one wording, one rule: `is_safe`'s)."""

from __future__ import annotations

import math


def threshold_reachable(largest_radius: float, threshold: float) -> bool:
    """Whether some frame can meet `threshold`: a threshold of 0 is not set; otherwise the largest
    certifiable radius must reach it (same units and norm; inf: no ceiling). A NaN threshold or
    radius is never met."""
    if math.isnan(threshold):
        return False
    return threshold <= 0.0 or (not math.isnan(largest_radius) and largest_radius >= threshold)


def unreachable_warning(where: str, largest_radius: float, threshold_name: str, threshold: float,
                        norm: str) -> str:
    """'' when some frame can meet the threshold, else the warning with both numbers.

    Args:
        where: what the radius measures, e.g. "model input" or "image 640x480 rgb8".
        largest_radius: the largest radius the model can ever certify there ([0,1] pixels, `norm`).
        threshold_name: the parameter, e.g. "safe_radius".
        threshold: its value, same units.
    """
    if threshold_reachable(largest_radius, threshold):
        return ""
    return (f"no frame can be safe: the largest radius the robust model can ever certify at the {where} is "
            f"{largest_radius:.6g} < {threshold_name} {threshold:.6g} ({norm}, [0,1] pixels)")
