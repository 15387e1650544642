"""One rule for meeting an activation-ratio target, the same for MoM's freeze and every baseline.

Each method fits its threshold (MoM: the gate offset; TEAL: the magnitude thresholds; MoEfication:
k / E; prune: the gate offset) on calibration tokens. If the ratio measured on those tokens misses the
target by more than the tolerance, the stage fails (TargetMissedError, with what to change). Ratio and
perplexity are then reported on held-out tokens the fit never saw; a held-out ratio that drifts beyond
the tolerance is reported with a note, not hidden and not refitted on them.
"""

from __future__ import annotations

from momcompress.errors import TargetMissedError

RATIO_TOLERANCE = 0.01  # largest accepted |fit ratio - target| (DESIGN.md: methods compared at the same ratio)


def describe(tolerance: float = RATIO_TOLERANCE) -> str:
    """The rule in one sentence, for manifests and tables."""
    return (
        f"every method fits its threshold on calibration tokens and fails if the ratio measured there misses the target "
        f"by more than ±{tolerance:g}; ratio and perplexity are measured on held-out tokens the fit never saw "
        f"(noted when the held-out ratio drifts beyond ±{tolerance:g})"
    )


def check_fit(method: str, target: float, fit_ratio: float, tolerance: float, remedy: str) -> None:
    """Raise TargetMissedError when the fitted ratio misses the target by more than tolerance."""
    if abs(fit_ratio - target) > tolerance:
        raise TargetMissedError(
            f"{method} cannot meet target {target:.3f} within ±{tolerance:g}: the nearest achievable ratio on the "
            f"calibration tokens is {fit_ratio:.4f}; {remedy}"
        )


def heldout_note(target: float, fit_ratio: float, heldout_ratio: float, tolerance: float) -> str | None:
    """A note when the held-out ratio drifts beyond the tolerance from the target (None otherwise)."""
    if abs(heldout_ratio - target) <= tolerance:
        return None
    return (
        f"held-out ratio {heldout_ratio:.4f} is {heldout_ratio - target:+.4f} from target {target:.3f} "
        f"(fit ratio on calibration tokens {fit_ratio:.4f}): the threshold does not transfer exactly to unseen text"
    )
