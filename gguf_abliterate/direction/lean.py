"""Where the model's plain answers sit on a behaviour's axis, and which way an edit moves them.

The edit scales the component along the direction `u` that the writers put into the residual
stream: abliterating at scale `s` by `1 - s`, reversing by `1 + s`. Since `W + s u u^T W` is
the same for `-u`, neither edit knows which side is the behaviour: reversing strengthens
whatever side the model already leans to on the prompts at hand, and abliterating pulls them
towards zero, which lies on the *positive* side of a model that leans negative. The position
of the pack's probes (asked plainly) along `u` at the direction's block, next to the positive
and negative sets' means, says in advance which way each edit moves this model. It is a
first-order guide (the residual at the last prompt token, one block): abliterating lands close
to it, reversing goes further (the amplified component is read and written again by the blocks
after), and the pack's measure on the edited model is the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gguf_abliterate.formats.direction_file import Direction

# probes read for the lean (more only where the layer test scores more): a mean position, not a
# per-prompt test; on the refusal pack all 72 cost the 1.5B's direction about 8% of its time
LEAN_PROBES = 32
# metadata keys of a direction file
PROBES, POSITIVE, NEGATIVE = "probe_projection", "positive_projection", "negative_projection"


@dataclass(frozen=True)
class Lean:
    """Mean projections on the unit direction at its block: the probes, the positive set, the
    negative set (positive > negative by construction)."""

    probes: float
    positive: float
    negative: float

    def after(self, reverse: bool, scale: float) -> float:
        """Where the probes' component goes under the edit (to first order)."""
        return self.probes * (1 + scale if reverse else 1 - scale)

    def after_steer(self, strength: float) -> float:
        """Where `--steer strength` takes them on average: that many mean differences further."""
        return self.probes + strength * (self.positive - self.negative)

    def share(self, value: float) -> float:
        """A position as a share of the way from the negative set's mean (0) to the positive's (1)."""
        return (value - self.negative) / (self.positive - self.negative)

    def metadata(self) -> dict[str, str]:
        return {PROBES: f"{self.probes:.6g}", POSITIVE: f"{self.positive:.6g}", NEGATIVE: f"{self.negative:.6g}"}

    def describe(self, behaviour: str) -> str:
        """One line: where the probes sit and what each edit does to them."""
        rev, abl = ("more", "less") if self.probes > 0 else ("less", "more")
        return (f"the pack's probes sit at {self.probes:+.2f} along the direction ({self.share(self.probes):.0%} "
                f"of the way from the negative prompts' {self.negative:+.2f} to the positive's {self.positive:+.2f}): "
                f"--reverse moves them towards {rev} {behaviour}, abliterating towards {abl}")

    def describe_edit(self, behaviour: str, reverse: bool, scale: float) -> str:
        """One line for the edit command: where this edit takes the probes."""
        after = self.after(reverse, scale)
        way = "more" if after > self.probes else "less" if after < self.probes else "no change in"
        return (f"{behaviour}: this edit takes the pack's probes from {self.share(self.probes):.0%} to about "
                f"{self.share(after):.0%} of the way from its negative prompts to its positive ones, towards "
                f"{way} {behaviour} (to first order; eval --behaviour {behaviour} measures it)")


def lean_at(residuals: np.ndarray, direction: np.ndarray, negative_mean: np.ndarray, gap: float) -> Lean:
    """The probes' mean projection on the unit `direction`, from their residuals (n_probes,
    n_embd) at the direction's block (llama.cpp's l_out, where the answer opens), beside the
    negative set's mean projection and that plus `gap` (the norm of the difference of means)."""
    negative = float(np.dot(negative_mean, direction))
    return Lean(float(residuals.astype(np.float64).dot(direction).mean()), negative + gap, negative)


def lean_of(direction: Direction) -> Lean | None:
    """The lean a direction file records, if `direction` measured it."""
    try:
        return Lean(*(float(direction.metadata[k]) for k in (PROBES, POSITIVE, NEGATIVE)))
    except (KeyError, ValueError):
        return None
