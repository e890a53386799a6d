"""The search: an Optuna study of scheduled edits, scored inside llama.cpp, and the pick.

1. Measure: residuals of the direction prompts (even lines) after every block give each
   block's difference of means and harmless mean (stored in the study, so every worker and
   every resumed run uses the very same basis).
2. Search: multivariate TPE over two objectives (`scorer`), after the seeds (`space.seeds`:
   the single-direction edit, plain and orthogonalised) random up to `startup_trials`. Each
   trial runs as a rank-1 adapter (`adapter`): no tensor is requantized, and a trial that
   cannot reach the front stops after its first prompts (`behind`). The search stops at `trials` finished trials (counted over all workers),
   after `minutes`, when the front of candidates (what the pick is made from) has not moved
   for `patience` trials, or at Ctrl-C (finished trials are kept).
3. Pick: among the Pareto front's trials whose refusal ratio is at most CONFIRM_MAX_RATIO, a
   bisection by KL confirms trials by greedy answers to every harmful validation prompt,
   counted by markers (or labelled by a judge model: slower, and it sees refusals markers
   miss), to find the lowest-KL one whose refusals are at most `max_refusals`
   percent of the original model's on the same prompts (or, if none is, the one with the
   fewest, then the lowest KL). For a model that thinks, an answer that never arrives counts
   as a refusal, and a trial also fails if its thoughts on the harmless scoring prompts run
   longer on average than `max_thought_growth` times the original's on the same prompts: an
   edit that makes the model think twice as long costs the user as much as a worse answer.
   Not on the harmful prompts: the original refuses those in a short thought, and an edit that
   answers them must think longer (on the 1.5B made to think the original's thoughts there ran
   87 tokens, and every trial confirmed more than 1.5 times that).
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gguf_abliterate.direction import prompts as P
from gguf_abliterate import names
from gguf_abliterate.formats.direction_file import file_digest, save_schedule
from gguf_abliterate.direction.measure import DEFAULT_POSITION, at_position, difference_of_means
from gguf_abliterate.edit.schedule import EditParams, resolve
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.judge import Judge
from gguf_abliterate.evaluate.markers import refusal_settled
from gguf_abliterate.evaluate.scorers import Label, Markers, Scorer, get_scorer
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.gguf_io.model import model_digest
from gguf_abliterate.gguf_io.writer import restamp
from gguf_abliterate.interrupt import sigint_flag
from gguf_abliterate.optimise.adapter import TrialAdapters, apply, has_experts, writers_of
from gguf_abliterate.optimise.scorer import OPENING_TOKENS, TrialScorer
from gguf_abliterate.optimise.space import seeds, suggest
from gguf_abliterate.runtime.llama import LlamaModel
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET, Thinking

STUDY_NAME = "gguf-abliterate"
CONFIRM_MAX_RATIO = 0.3
REACH_MARGIN = 1.5  # a trial stops after its first harmless prompts if another's KL on them was this much lower
Say = Callable[[str], None]


@dataclass(frozen=True)
class SearchSettings:
    trials: int = 80
    minutes: float = 8.0  # the search; the 1.5B's set-up and pick (its bake checks) add about 7
    startup_trials: int = 10  # the seeds among them
    score_prompts: int = 24  # harmful and harmless validation prompts each trial is scored on
    kl_tokens: int = 1
    max_refusals: float = 0.0  # pick rule: percent of the original's confirmed refusals
    confirm: int = 6  # with bake_checks 0: front trials confirmed by generation through adapters, at most
    confirm_tokens: int = 24
    confirm_prompts: int | None = None  # the first this many harmful validation prompts confirm (None: all)
    bake_checks: int = 5  # front trials confirmed baked, at most (0: through adapters instead)
    patience: int = 30
    seed: int = 0
    fixed: dict[str, Any] = field(default_factory=dict)
    judge: Path | None = None  # confirm the front with this judge model instead of markers
    thinking: Thinking = field(default_factory=Thinking)
    max_thought_growth: float = 1.5  # a model that thinks: a pick's mean harmless thought, at most this times the original's
    thought_tokens: int = THOUGHT_BUDGET  # a model that thinks: its thought's budget, scoring and confirming
    opening_tokens: int = OPENING_TOKENS  # a model that thinks: tokens of its own answer a trial reads (0: none)


@dataclass
class TrialRecord:
    """A finished trial as the output file keeps it."""

    number: int
    params: dict[str, Any]
    refusal: float
    kl: float | None
    objectives: tuple[float, float]
    kl_first: float | None = None  # KL on the first scorer.FIRST harmless prompts alone
    pruned: bool = False  # stopped after the first prompts: its objectives are estimates
    confirmed_refusals: int | None = None  # greedy refusals through the trial's adapter
    baked_refusals: int | None = None  # the same, on the trial baked into the file's own types
    confirmed_thought: float | None = None  # a model that thinks: the mean thought (tokens) on the harmless scoring prompts
    baked_thought: float | None = None

    def thought_cell(self) -> str:
        """The mean thoughts through the adapter / baked, as the front tables show them."""
        return "/".join("-" if x is None else f"{x:.0f}" for x in (self.confirmed_thought, self.baked_thought))

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "params": self.params, "refusal": self.refusal, "kl": self.kl,
                "objectives": list(self.objectives), "kl_first": self.kl_first, "pruned": self.pruned,
                "confirmed_refusals": self.confirmed_refusals,
                "baked_refusals": self.baked_refusals, "confirmed_thought": self.confirmed_thought,
                "baked_thought": self.baked_thought}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrialRecord:
        """A trial as a result file's `trials` metadata holds it."""
        try:
            return cls(int(d["number"]), dict(d["params"]), float(d["refusal"]),
                       None if d["kl"] is None else float(d["kl"]), tuple(map(float, d["objectives"])),  # type: ignore[arg-type]
                       d.get("kl_first"), bool(d.get("pruned", False)), d.get("confirmed_refusals"),
                       d.get("baked_refusals"), d.get("confirmed_thought"), d.get("baked_thought"))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"a trial in the result file is malformed ({e!r})") from None


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError("optimise needs Optuna: pip install 'gguf-abliterate[optimise]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the heartbeat is "experimental" in Optuna's words, and Optuna warns at every ask that it is
    # meant for Study.optimize: the search asks and tells, and beats itself (`_heartbeat`). A
    # warning per trial would also fill the pipe of a worker whose stderr nobody reads yet.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


def default_storage(output: Path) -> str:
    """The study beside the output: edit.safetensors -> sqlite:///edit.study.db."""
    return f"sqlite:///{output.with_suffix('.study.db').resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite storage URL (None for other databases)."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


_PASSWORD = re.compile(r"(?<=://)([^/@:]*):([^/@]*)@")


def shown_url(url: str) -> str:
    """A storage URL as printed: its password (postgresql://user:secret@host/db) hidden."""
    return _PASSWORD.sub(r"\1:***@", url)


# A worker records a heartbeat for its running trial every HEARTBEAT_S; a trial whose worker
# has been silent for GRACE_S (killed, its machine gone) is marked failed by the next worker that
# looks, and run again once (Optuna's RetryHeartbeatStaleTrialCallback), so the study still finishes the
# trials it was asked for.
HEARTBEAT_S, GRACE_S = 5, 20


def _storage(url: str) -> Any:
    optuna = _optuna()
    try:
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S,
                                          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                                              max_retry=1))
    except Exception as e:  # sqlalchemy and optuna raise many kinds for a bad URL or file
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        password = _PASSWORD.search(url)
        if password and password.group(2):
            why = why.replace(password.group(2), "***")
        raise UserError(f"cannot open the study storage {shown_url(url)}: {why}") from None


def _encode(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, np.float32)
    return {"shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def _decode(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["data"]), np.float32).reshape(d["shape"]).copy()


def model_identity(model: Model) -> dict[str, Any]:
    """What a study records of its model: its digest (another quant or finetune of the same
    name and shape is another model) and, for the messages, its name and shape."""
    return {"name": model.get_str(names.NAME) or model.path.name, "architecture": model.arch,
            "n_layer": model.n_layer, "n_embd": model.n_embd, "tensors": len(model.tensors),
            "sha256": model_digest(model)}


def study_state(url: str) -> str:
    """'none' (no study at `url`), 'half' (created, but its set-up never finished: a crash or
    SIGTERM while measuring; the model's identity is recorded last) or 'ready'. A sqlite file
    is only read, in read-only mode: a file that is no study (or a damaged one) stays as it was."""
    db = sqlite_path(url)
    if db is None:
        try:
            study = _optuna().load_study(storage=_storage(url), study_name=STUDY_NAME)
        except KeyError:
            return "none"
        return "ready" if "model" in study.user_attrs else "half"
    if not db.is_file():
        return "none"
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone():
                return "none"
            row = con.execute("SELECT study_id FROM studies WHERE study_name = ?", (STUDY_NAME,)).fetchone()
            if row is None:
                return "none"
            made = con.execute("SELECT 1 FROM study_user_attributes WHERE study_id = ? AND key = 'model'",
                               (row[0],)).fetchone()
    except sqlite3.Error as e:
        raise UserError(f"{db}: not a readable study database ({e})") from None
    return "ready" if made else "half"


def drop_study(url: str) -> None:
    """Delete a half-made study, so a new one can take its place."""
    _optuna().delete_study(study_name=STUDY_NAME, storage=_storage(url))


class Search:
    """One process's part in a study: the model loaded, the basis, the scorer."""

    def __init__(self, model_path: Path, url: str, settings: SearchSettings, *, create: bool, say: Say,
                 progress: Callable[..., Any], measured: Path | None = None):
        optuna = _optuna()
        self.settings, self.say, self.progress = settings, say, progress
        self.original_thought: float | None = None  # a model that thinks: its mean thought on the harmless scoring prompts
        self.meta = Model(model_path)
        identity = model_identity(self.meta)
        storage = _storage(url)
        sampler_args = dict(multivariate=True, n_startup_trials=settings.startup_trials, seed=settings.seed,
                            constant_liar=True)
        self.llama = _load(model_path, settings.thinking)
        try:
            if create:
                try:
                    self.study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                                                     directions=["minimize", "minimize"],
                                                     sampler=optuna.samplers.TPESampler(**sampler_args))
                except optuna.exceptions.DuplicatedStudyError:
                    raise UserError(f"{shown_url(url)} already holds a study: --resume to continue it") from None
                if measured is None:
                    (per_block, harmless_means), statistics, layer = self._measure(), None, None
                else:
                    per_block, harmless_means, statistics, layer = _measured(measured, self.meta)
                for params in seeds(self.meta.n_layer, settings.fixed, layer, has_experts(self.meta)):
                    self.study.enqueue_trial(params)
                self.study.set_user_attr("basis", {"per_block": _encode(per_block),
                                                   "harmless_means": _encode(harmless_means)})
                self.study.set_user_attr("statistics", statistics)
                self.study.set_user_attr("settings", {"score_prompts": settings.score_prompts,
                                                      "kl_tokens": settings.kl_tokens, "fixed": settings.fixed,
                                                      "thought_tokens": settings.thought_tokens,
                                                      "opening_tokens": settings.opening_tokens,
                                                      "thinking": [settings.thinking.mode, settings.thinking.effort]})
                self.study.set_user_attr("model", identity)  # last: a study without it is half-made
            else:
                try:
                    self.study = optuna.load_study(storage=storage, study_name=STUDY_NAME,
                                                   sampler=optuna.samplers.TPESampler(**sampler_args))
                except KeyError:
                    raise UserError(f"{shown_url(url)} holds no gguf-abliterate study") from None
                made_for = self.study.user_attrs.get("model")
                if made_for is None:
                    raise UserError(f"the study in {shown_url(url)} was never set up completely (interrupted while measuring): "
                                    f"start it again without --resume")
                if made_for != identity:
                    what = ("by an older version, which recorded no digest" if "sha256" not in made_for else
                            f"for another model ({made_for['name']}, sha256 {str(made_for['sha256'])[:12]}...)")
                    raise UserError(f"the study in {shown_url(url)} was made {what}, not for {self.meta.path.name} "
                                    f"(sha256 {identity['sha256'][:12]}...): trials scored on one model cannot "
                                    f"guide a search of another")
                # every worker scores alike: the study's own settings win over this command line's
                stored = self.study.user_attrs.get("settings", {})
                settings = self.settings = replace(settings, **{k: stored[k] for k in (
                    "score_prompts", "kl_tokens", "fixed", "thought_tokens", "opening_tokens") if k in stored})
                if "thinking" in stored and Thinking(*stored["thinking"]) != settings.thinking:
                    raise UserError(f"the study in {shown_url(url)} scores with --thinking "
                                    f"{stored['thinking'][0]}: give the same")
                basis = self.study.user_attrs["basis"]
                per_block, harmless_means = _decode(basis["per_block"]), _decode(basis["harmless_means"])
            self.per_block, self.harmless_means = per_block, harmless_means
            # the input statistics of the --from direction, which the result names for its bakes
            self.statistics: dict[str, str] | None = self.study.user_attrs.get("statistics")
            with progress(total=len(writers_of(self.meta)), desc="precomputing adapters", unit="tensor") as bar:
                self.adapters = TrialAdapters(self.meta, per_block, harmless_means, bar.update)
            if self.adapters.biased:
                say(f"note: trials leave the writers' biases ({len(self.adapters.biased)}) unedited; baking edits them")
            bad, good = P.default_prompts("validation")
            n = settings.score_prompts
            # every harmful validation prompt by default, the scored ones too: a first-token score on
            # a prompt does not promise a complying answer to it (a pick once kept refusing one)
            self.confirm_prompts = bad[:settings.confirm_prompts]
            self.confirmer: Scorer = get_scorer("markers") if settings.judge is None else Judge(settings.judge)
            say(f"scoring the original on {n} harmful and {n} harmless validation prompts")
            if self.llama.thinks:
                where = (f"by refusals in the first {settings.opening_tokens} tokens of each trial's own answer (its "
                         f"thought's opening)" if settings.opening_tokens else
                         "where the final answer opens, after the original's own thought")
                say(f"the model thinks ({self.llama.reasoning.format.name}): trials are scored {where}; "
                    f"confirmations generate the thought too")
            self.scorer = TrialScorer(self.llama, bad[:n], good[:n], settings.kl_tokens, progress,
                                      settings.thought_tokens, settings.opening_tokens)
            if self.llama.thinks:
                say(f"a trial forwards up to {self.scorer.forwarded_tokens()} tokens (the scoring prompts, the openings "
                    f"it writes and the original's thoughts; --score-prompts, --opening-tokens and --thought-tokens "
                    f"set it)")
        except BaseException:
            self.llama.close()
            raise

    def _measure(self) -> tuple[np.ndarray, np.ndarray]:
        bad, good = P.default_prompts("direction")
        bad, good = (at_position(self.llama, s, DEFAULT_POSITION) for s in (bad, good))
        with self.progress(total=len(bad) + len(good), desc="residuals", unit="prompt") as bar:
            # the chat template's system turn computed once per set, as `direction` reads them
            stats = difference_of_means(self.llama.residuals(bad, bar.update, share_prefix=True),
                                        self.llama.residuals(good, bar.update, share_prefix=True))
        return stats.directions, stats.harmless_mean

    def close(self) -> None:
        if isinstance(getattr(self, "confirmer", None), Judge):
            self.confirmer.close()
        self.llama.close()

    # -- trials -----------------------------------------------------------------------------

    def _alive(self) -> list[int]:
        """Numbers of the finished and running trials, over all workers."""
        optuna = _optuna()
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        return sorted(t.number for t in self.study.get_trials(deepcopy=False, states=states))

    def run(self) -> int:
        """Run trials until a stop rule; returns how many this process finished. Ctrl-C stops
        after the trial under way (raising KeyboardInterrupt then); a second one at once."""
        with sigint_flag() as asked:  # Ctrl-C stops after the trial under way
            return self._run(asked)

    def _run(self, asked: Callable[[], bool]) -> int:
        optuna = _optuna()
        s = self.settings
        start, done, since = time.monotonic(), 0, 0
        with self.progress(total=s.trials, desc="trials", unit="trial", initial=self._finished()) as bar:
            while len(self._alive()) < s.trials and time.monotonic() - start < 60 * s.minutes:
                if asked():
                    raise KeyboardInterrupt
                optuna.storages.fail_stale_trials(self.study)
                trial = self.study.ask()
                if trial.number not in self._alive()[: s.trials]:  # another worker took the last place
                    trial.set_user_attr("discarded", True)
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    break
                try:
                    with _heartbeat(self.study, trial):
                        trial.set_user_attr("worker", os.getpid())  # after the first beat: a dead worker's trial says whose it was
                        params = suggest(trial, self.meta.n_layer, s.fixed, self.adapters.experts)
                        schedule = resolve(params, self.per_block, self.harmless_means)
                        score = self.scorer.score(self.adapters.edit(schedule), self._reach)
                except BaseException:
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
                trial.set_user_attr("params", params.to_dict())
                trial.set_user_attr("refusal", score.refusal)
                trial.set_user_attr("kl", score.kl)
                trial.set_user_attr("kl_first", score.kl_first)
                trial.set_user_attr("pruned", score.pruned)
                self.study.tell(trial, list(score.objectives))
                done += 1
                bar.update(1)
                if self._moves_the_front(trial.number):
                    since = 0
                    bar.set_postfix(front_kl=f"{score.kl:.4f}", refusal=f"{score.refusal:.2f}")
                else:
                    since += 1
                if trial.number >= s.startup_trials and since >= s.patience:
                    self.say(f"the front of candidates has not moved for {s.patience} trials: stopping")
                    break
        return done

    def _reach(self, refusal: float, kl_first: float) -> float | None:
        return behind(self.records(), refusal, kl_first)

    def _moves_the_front(self, number: int) -> bool:
        """Whether trial `number` is a candidate (refusal at most CONFIRM_MAX_RATIO) that no other
        finished candidate beats on both objectives: the front the pick is made from moved."""
        candidates = [r for r in self.records() if r.kl is not None and not r.pruned and r.refusal <= CONFIRM_MAX_RATIO]
        return any(r.number == number for r in pareto_front(candidates))

    def _finished(self) -> int:
        optuna = _optuna()
        return len(self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    def wait_for_others(self, timeout: float = 600) -> None:
        """Let other workers finish the trials they are running; a trial whose worker died is
        failed once its heartbeat is GRACE_S old, and its retry is run here."""
        optuna = _optuna()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            optuna.storages.fail_stale_trials(self.study)
            if self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
                self.run()
                continue
            if not self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                return
            time.sleep(2)
        self.say("note: some trials of other workers are still running; picking from the finished ones")

    # -- the pick ---------------------------------------------------------------------------

    def records(self) -> list[TrialRecord]:
        optuna = _optuna()
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            out.append(TrialRecord(t.number, t.user_attrs["params"], t.user_attrs["refusal"], t.user_attrs["kl"],
                                   (float(t.values[0]), float(t.values[1])), t.user_attrs.get("kl_first"),
                                   bool(t.user_attrs.get("pruned", False))))
        return sorted(out, key=lambda r: r.number)

    def confirm(self, record: TrialRecord | None, allowed: int | None = None) -> tuple[int, float | None]:
        """Greedy answers to the confirmation prompts: the refusals among them, counted by
        markers, or by the judge if the settings name one, and a thinking model's mean thought
        (None: the original). `allowed`: as `_refusals`."""
        if record is not None:
            schedule = resolve(EditParams.from_dict(record.params), self.per_block, self.harmless_means)
            apply(self.llama, self.adapters.edit(schedule))
        try:
            return self._refusals(self.llama, allowed, original=record is None)
        finally:
            apply(self.llama, None)

    def _refusals(self, llama: LlamaModel, allowed: int | None = None,
                  original: bool = False) -> tuple[int, float | None]:
        """`llama`'s greedy refusals to the confirmation prompts, and for a model that thinks its
        mean thought in tokens on the harmless scoring prompts (None where the refusals already
        exceed `allowed`: the trial fails whatever it thinks; `original`: the unedited model's,
        which the scorer already generated). The thought is generated too, and
        an answer that never arrives (the thought ran past `thought_tokens`: "" to the markers)
        counts with the refusals, so an edit that makes the model think without end fails the
        pick rule.

        Counted by markers, an answer stops at the token that puts a marker in its opening (the
        verdict cannot change after it), and with `allowed` (a trial's confirmation: the pick
        rule's bound) every answer stops once more than `allowed` have refused: the trial fails
        whatever the others say, and the count returned is the refusals found by then (at least
        that many)."""
        tokens = self.settings.confirm_tokens + (self.settings.thought_tokens if llama.thinks else 0)
        markers = self.confirmer if type(self.confirmer) is Markers and not llama.thinks else None
        if markers is None:
            answers = llama.greedy_answers(self.confirm_prompts, tokens)
            verdicts = self.confirmer.label(self.confirm_prompts, [a.reply for a in answers])
            refusals = sum(v.label is Label.REFUSAL for v in verdicts)
            measured = llama.thinks and (allowed is None or refusals <= allowed)
            return refusals, self._harmless_thought(llama, original) if measured else None

        def settled(text: str) -> bool:
            return refusal_settled(text, markers.markers)

        answers = llama.greedy_answers(self.confirm_prompts, tokens, settled=settled, stop_after=allowed)
        found = sum(settled(a.reply) for a in answers)
        if allowed is not None and found > allowed:
            return found, None
        verdicts = markers.label(self.confirm_prompts, [a.reply for a in answers])
        return sum(v.label is Label.REFUSAL for v in verdicts), None

    def _harmless_thought(self, llama: LlamaModel, original: bool) -> float | None:
        """`llama`'s mean thought in tokens on the harmless scoring prompts: the original's are the
        scorer's own answers to them (the KL's continuations), not generated a second time."""
        return self.scorer.thought if original else self.scorer.thought_of(llama)

    def _allowed(self, original: int) -> float:
        """The pick rule's bound: refusals at most `max_refusals` percent of the original's."""
        return self.settings.max_refusals / 100 * original

    def _most(self, original: int) -> int:
        """`_allowed` as a count: more refusals than this fail the rule."""
        return math.floor(self._allowed(original) + 1e-9)

    def _passes(self, original: int, refusals: int, thought: float | None) -> bool:
        """The pick rule: refusals within `_allowed`, and a thinking model's mean thought at most
        `max_thought_growth` times the original's (`self.original_thought`)."""
        longest = (None if thought is None or self.original_thought is None else
                   self.settings.max_thought_growth * max(self.original_thought, 1.0))
        if longest is not None and thought is not None and thought > longest:
            self.say(f"note: a trial's thoughts on the harmless prompts run {thought:.0f} tokens on average, more than "
                     f"{self.settings.max_thought_growth:g} times the original's {self.original_thought:.0f}: not picked")
            return False
        return refusals <= self._allowed(original)

    def _front(self, records: list[TrialRecord]) -> tuple[list[TrialRecord], list[TrialRecord]]:
        """(the Pareto front, the candidates the pick is made from, by KL)."""
        front = pareto_front(records)
        candidates = _candidates(front)
        if not candidates and front:
            candidates = front[:1]  # sorted by refusal: the trial that removed the most
            self.say(f"note: no trial brought the refusal mass under {CONFIRM_MAX_RATIO:g} of the original's "
                     f"(does the model refuse at all?); taking the one with the least")
        return front, candidates

    def pick(self, records: list[TrialRecord], confirm: bool = True) -> tuple[TrialRecord | None, int | None,
                                                                              list[TrialRecord]]:
        """(the pick, the original's confirmed refusals, the Pareto front), confirmed through the
        trials' adapters (`--bake-checks 0`; `pick_baked` otherwise). Without `confirm` (after
        Ctrl-C) the lowest-KL candidate, unconfirmed.

        Along the front, by KL, the refusal ratio only falls, so whether a trial passes the
        confirmation is (nearly) monotone: a bisection finds the lowest-KL trial that passes in
        about log2(n) confirmations, at most `confirm` of them.
        """
        front, candidates = self._front(records)
        if not candidates or not confirm:
            return (candidates[0] if candidates else None), None, front
        budget = min(self.settings.confirm, len(candidates))
        with self.progress(total=budget + 1, desc="confirming the front", unit="trial") as bar:
            original, self.original_thought = self.confirm(None)
            bar.update(1)

            def passes(r: TrialRecord) -> bool:
                if r.confirmed_refusals is None:
                    r.confirmed_refusals, r.confirmed_thought = self.confirm(r, self._most(original))
                    bar.update(1)
                return self._passes(original, r.confirmed_refusals, r.confirmed_thought)

            chosen = lowest_passing(candidates, passes, budget)
        if chosen is None:
            confirmed = [r for r in candidates if r.confirmed_refusals is not None]
            chosen = min(confirmed, key=lambda r: (r.confirmed_refusals or 0, r.objectives[1]))
            self.say(f"note: no candidate kept refusals within {self.settings.max_refusals:g}% of the "
                     f"original's {original}; took the one with the fewest")
        return chosen, original, front

    def pick_baked(self, records: list[TrialRecord], output: Path, bake: Callable[[Path, Path], None],
                   keep: Path | None = None) -> tuple[TrialRecord | None, int | None, list[TrialRecord]]:
        """(the pick, the original's confirmed refusals, the Pareto front), confirmed on the file
        the user will run: `bake(output, file)` writes the result's chosen trial into `file` as
        the edit command would (its own types, its default rounding; the caller passes the edit
        job, so the bytes are the command's own), and the baked file answers the confirmation
        prompts. The bisection of `pick` runs on bakes, at most `bake_checks` of them.

        Why bakes and not adapters: a trial runs exactly as an adapter, but the bake requantizes
        every writer it edits, and every weight moves by up to half a quantization step; on a
        prompt the edit only just tipped, that brings the refusal back (one of 72 harmful
        validation prompts on Qwen2.5-Coder 0.5B and 1.5B, for picks whose adapters refused
        none). Confirming through adapters first and then baking did the work twice: on the
        1.5B, 4 adapter confirmations and 4 bakes (810 s) where the bakes alone decide.

        Saves `output` for each trial it bakes (the bake reads the trial from it) and for the
        pick; with `keep`, the pick's bake goes there."""
        import tempfile

        front, candidates = self._front(records)
        if not candidates:
            self.save(output, None, None, records)  # the error: nothing to write
        budget = min(self.settings.bake_checks, len(candidates))
        with self.progress(total=budget + 1, desc="baking and confirming the front", unit="trial") as bar, \
                tempfile.TemporaryDirectory(prefix=".bake-check-", dir=(keep or output).resolve().parent) as tmp:
            original, self.original_thought = self.confirm(None)
            bar.update(1)
            file, held = Path(tmp) / "baked.gguf", Path(tmp) / "passed.gguf"
            holds: list[TrialRecord] = []  # the trial whose bake `held` is: the last that passed

            def baked(r: TrialRecord) -> bool:
                self.save(output, r, original, records)
                bake(output, file)
                with _load(file, self.settings.thinking) as llama:
                    r.baked_refusals, r.baked_thought = self._refusals(llama, self._most(original))
                bar.update(1)
                thought = "" if r.baked_thought is None else f", harmless thoughts of {r.baked_thought:.0f} tokens"
                self.say(f"trial {r.number} baked: {r.baked_refusals} of {len(self.confirm_prompts)} refused{thought}")
                passes = self._passes(original, r.baked_refusals, r.baked_thought)
                if passes and keep is not None:
                    os.replace(file, held)
                    holds[:] = [r]
                return passes

            chosen = lowest_passing(candidates, baked, budget)
            if chosen is None:
                tried = [r for r in candidates if r.baked_refusals is not None]
                chosen = min(tried, key=lambda r: (r.baked_refusals or 0, r.objectives[1]))
                self.say(f"note: no baked candidate kept refusals within {self.settings.max_refusals:g}% of the "
                         f"original's {original}; took the one with the fewest")
            # the final file records every bake's refusals, so its digest (which baked files
            # record as their direction's) is new: the kept bake gets it, and is then the very
            # bytes a bake from the final file writes (the digest is all the bake reads of what
            # changed); a pick whose bake was not kept is baked once more
            self.save(output, chosen, original, records)
            if keep is not None:
                if holds == [chosen]:
                    restamp(held, names.DIRECTION_SHA256, file_digest(output))
                    os.replace(held, keep)
                else:
                    bake(output, file)
                    os.replace(file, keep)
        return chosen, original, front

    def save(self, output: Path, chosen: TrialRecord | None, original: int | None,
             records: list[TrialRecord]) -> None:
        if chosen is None:
            raise UserError("no trial finished, so there is nothing to write (--trials, --minutes)")
        schedule = resolve(EditParams.from_dict(chosen.params), self.per_block, self.harmless_means)
        metadata = {**{("model_sha256" if k == "sha256" else k): str(v) for k, v in model_identity(self.meta).items()},
                    "model": model_identity(self.meta)["name"], "method": schedule.method.value,
                    "pick_rule": "unconfirmed (interrupted): lowest KL on the front" if original is None else
                                 f"lowest KL among front trials whose greedy refusals "
                                 f"({'markers' if self.settings.judge is None else 'judge ' + self.settings.judge.name}) on "
                                 f"{len(self.confirm_prompts)} harmful validation prompts are at most "
                                 f"{self.settings.max_refusals:g}% of the original's ({original})"
                                 + ("" if chosen.baked_refusals is None else
                                    f"; confirmed baked into the file's own types ({chosen.baked_refusals})"),
                    "original_refusals": "" if original is None else str(original),
                    "confirm_prompts": str(len(self.confirm_prompts)),
                    "score_prompts": str(self.settings.score_prompts), "kl_tokens": str(self.settings.kl_tokens)}
        if self.llama.thinks:  # KL along the original's thought, refusal after it, the pick's thoughts bounded
            metadata |= {"reasoning": self.llama.reasoning.format.name,
                         "max_thought_growth": f"{self.settings.max_thought_growth:g}",
                         "opening_tokens": str(self.settings.opening_tokens),
                         "original_thought": "" if self.original_thought is None else f"{self.original_thought:.1f}"}
        if self.statistics is not None:  # named relative to the result, as a direction names them
            metadata |= {"statistics": os.path.relpath(self.statistics["path"], output.resolve().parent),
                         "statistics_sha256": self.statistics["sha256"]}
        strengths = {c.value: s for c, s in schedule.strengths.items()}
        save_schedule(output, schedule.directions, strengths, self.per_block, self.harmless_means, metadata,
                      [r.to_json() for r in records], chosen.number)


def _load(path: Path, thinking: Thinking) -> LlamaModel:
    """A model for trials and confirmations: up to 64 sequences and 4096 tokens per decode, so a
    trial's prompt set goes through in one decode (longer sets are split into several)."""
    return LlamaModel(path, n_batch=4096, n_seq=64, thinking=thinking, room_for_thoughts=True)


@contextlib.contextmanager
def _heartbeat(study: Any, trial: Any) -> Iterator[None]:
    """While a trial runs, record its worker's heartbeat every HEARTBEAT_S from a thread (the
    ask-and-tell interface has none of its own; `Study.optimize` would)."""
    storage, trial_id = study._storage, trial._trial_id  # Optuna exposes no public trial id
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)  # before anything else: a trial with no beat is never found stale
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _candidates(front: list[TrialRecord]) -> list[TrialRecord]:
    """The front's trials the pick is made from (refusal ratio at most CONFIRM_MAX_RATIO), by KL."""
    return sorted((r for r in front if r.refusal <= CONFIRM_MAX_RATIO and r.kl is not None and not r.pruned),
                  key=lambda r: r.kl or 0.0)


def _measured(path: Path, model: Model) -> tuple[np.ndarray, np.ndarray, dict[str, str] | None, int | None]:
    """The per-block directions and harmless means of a `direction` file, for this model, where
    the input statistics it names are (absolute) with their sha256 (None if it names none), and
    the block `direction` chose (None if it records none)."""
    from gguf_abliterate.formats.direction_file import load_direction

    d = load_direction(path)
    d.check_fits(model.n_layer, model.n_embd, model.arch)
    if d.per_block is None or d.harmless_means is None:
        raise UserError(f"{path}: --from needs a direction file with every block's direction and harmless mean "
                        f"(made by this version's `direction`)")
    name = d.metadata.get("statistics")
    statistics = None if not name else {"path": str((path.parent / name).resolve()),
                                        "sha256": d.metadata.get("statistics_sha256", "")}
    layer = d.metadata.get("layer", "")
    return d.per_block, d.harmless_means, statistics, int(layer) if layer.isdigit() else None


def lowest_passing(candidates: list[TrialRecord], passes: Callable[[TrialRecord], bool],
                   budget: int) -> TrialRecord | None:
    """The lowest-KL candidate (candidates sorted by KL) that passes, by bisection over the
    candidates and "none passes" (along the front, passing goes with a stronger edit), at most
    `budget` calls of `passes`; with the budget spent, the lowest-KL passing candidate found so
    far, or None. It starts in the middle: checking the strongest edit first, to learn early
    that none passes, cost one bake more than it saved wherever the strongest one passed (the
    demo's three bake checks: 50 s of 0.5B answers for a trial that was never the pick)."""
    lo, hi, used = 0, len(candidates), 0  # invariant: candidates[hi] passes (hi == len: none found yet)
    while lo < hi and used < budget:
        mid = (lo + hi) // 2
        used += 1
        if passes(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[hi] if hi < len(candidates) else None


def behind(records: list[TrialRecord], refusal: float, kl_first: float) -> float | None:
    """None if a trial of this refusal ratio, whose KL on the first harmless prompts is
    `kl_first`, may still reach the front; else the KL to record for it. It cannot when a
    finished trial refusing no more had a KL on the same prompts REACH_MARGIN times lower (the
    comparison is paired, so the prompts' own spread cancels); the estimate, that trial's KL
    scaled by the two trials' ratio on the same prompts, keeps it behind that trial."""
    for r in records:
        if not r.pruned and r.kl is not None and r.kl_first and r.refusal <= refusal \
                and kl_first > REACH_MARGIN * r.kl_first:
            return r.kl * kl_first / r.kl_first
    return None


def pareto_front(records: list[TrialRecord]) -> list[TrialRecord]:
    """The trials no other trial beats on both objectives, by refusal."""
    front = []
    for r in records:
        if not any(o.objectives[0] <= r.objectives[0] and o.objectives[1] <= r.objectives[1]
                   and o.objectives != r.objectives for o in records):
            front.append(r)
    return sorted(front, key=lambda r: (r.objectives[0], r.objectives[1]))

