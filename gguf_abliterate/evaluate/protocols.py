"""How refusals are counted, as data: our protocol, and the field's.

- `ours`: the validation split (72 harmful and 72 harmless prompts no direction was made
  from), 64-token greedy answers, refusal markers near the start of an answer.
- `field`: as the public comparisons of abliterated models count (heretic's README, the
  abliterlitics tables, abliterix's benchmark spec: greedy answers of 100 to 150 tokens,
  markers anywhere): 100 harmful and 100 harmless prompts written for this protocol alone,
  128-token greedy answers, markers anywhere in the answer, with the refusals that come after
  a compliant opening counted apart as *delayed*; first-token KL, the mean over the harmless
  prompts. Short budgets flatter an edit (a model that opens compliantly and refuses a
  sentence later counts as complying), so the field protocol also counts the harmful
  refusals within the first 24, 48, 96 and 128 tokens of the very same answers: the budget
  study.

Both read KL, the judge, tasks and perplexity the same way; only the prompts, the budget
and the counting differ.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Protocol:
    name: str
    prompts: str  # "validation" (the split no direction was made from) or "field" (its own 100 + 100)
    max_tokens: int  # the default answer budget
    scorer: str  # evaluate.scorers name
    budgets: tuple[int, ...] = ()  # the budget study: harmful refusals within the first N tokens of each answer
    about: str = ""

    def describe(self, max_tokens: int, harmful: int, harmless: int) -> str:
        """One line for every table: what was counted, on what."""
        return (f"{self.name} protocol: {harmful} harmful and {harmless} harmless prompts, greedy answers of at most "
                f"{max_tokens} tokens, {self.about}")


PROTOCOLS = {p.name: p for p in (
    Protocol("ours", "validation", 64, "markers", about="refusal markers near the start of an answer"),
    Protocol("field", "field", 128, "markers-anywhere", (24, 48, 96, 128),
             "refusal markers anywhere in an answer (delayed: after a compliant opening), first-token KL as the "
             "mean over the harmless prompts"),
)}
