"""`wavg soup`: choose which checkpoints to average by their score on held-out data.

The greedy soup (Wortsman et al., 2022): score every checkpoint on a held-out set, rank them
best first, start from the best, and keep each next one if the uniform average of the kept
ones plus it scores at least as well; write the uniform average of the kept ones. Every
average is made by `wavg.combine` and every model loaded by `wavg.workflows.model_loading`; this module
never scores on the data `evaluate` reports (see `wavg.workflows.data.load_validation`).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wavg.averaging.engine import combine as wavg_combine
from wavg.averaging.ordering import epoch_numbers, order_checkpoints
from wavg.errors import UsageError
from wavg.workflows.data import Dataset, check_inputs_fit, load_data, load_validation
from wavg.workflows.scoring import (
    Scorer,
    check_metric,
    compiled_model_for,
    higher_is_better,
    suffix_of,
)

SCHEMA = "wavg.soup/1"

Prepare = Callable[[Path, Path], Path]  # (averaged file, scratch dir) -> the file to score


@dataclass(frozen=True)
class SoupStep:
    """One greedy step: the soup with `candidate` added scored `score`; `kept` if not worse."""

    candidate: int  # index into the members, oldest first
    score: float
    kept: bool


def greedy(
    ranked: Sequence[int],
    score_of: Callable[[frozenset[int]], float],
    higher: bool,
    on_step: Callable[[SoupStep], None] | None = None,
) -> tuple[list[int], list[SoupStep]]:
    """The greedy soup over `ranked` (best single first): return the kept members (in the
    order they were added) and every step, the first being the best single on its own.

    `score_of(members)` scores the uniform average of a set of members. A candidate is kept
    when the soup with it scores at least as well as the soup without it, so the soup's score
    never falls below the best single's.
    """
    if not ranked:
        raise UsageError("no checkpoints to make a soup of")
    kept = [ranked[0]]
    best = score_of(frozenset(kept))
    steps = [SoupStep(ranked[0], best, True)]
    if on_step is not None:
        on_step(steps[0])
    for candidate in ranked[1:]:
        score = score_of(frozenset([*kept, candidate]))
        keep = score >= best if higher else score <= best
        if keep:
            kept.append(candidate)
            best = score
        steps.append(SoupStep(candidate, score, keep))
        if on_step is not None:
            on_step(steps[-1])
    return kept, steps


def rank(scores: Sequence[float], higher: bool) -> list[int]:
    """Member indices best first; ties go to the newer checkpoint (the larger index)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i] if higher else scores[i], -i))


class SubsetScores:
    """Scores of the uniform averages of sets of `members` on one scorer, each computed once.

    Averages are written by `wavg.combine` into `scratch` (a private temporary directory),
    passed through `prepare` (e.g. a BatchNorm recalibration) when given, scored and deleted.
    A single member is scored from its own file, unless `prepare` needs a copy.
    """

    def __init__(
        self,
        members: Sequence[Path],
        scorer: Scorer,
        metric: str,
        scratch: Path,
        prepare: Prepare | None = None,
    ) -> None:
        self.members, self.scorer, self.metric = list(members), scorer, metric
        self.scratch, self.prepare = scratch, prepare
        self._cache: dict[frozenset[int], dict[str, float]] = {}
        self._names = itertools.count()

    def score(self, subset: frozenset[int]) -> float:
        return self.scores(subset)[self.metric]

    def scores(self, subset: frozenset[int]) -> dict[str, float]:
        if subset not in self._cache:
            with self.averaged(subset) as path:
                self._cache[subset] = self.scorer.score(self.scorer.predict_file(path))
        return self._cache[subset]

    def averaged(self, subset: frozenset[int]) -> _Averaged:
        """A context manager yielding the (prepared) average of `subset`, deleted on exit."""
        return _Averaged(self, subset)


class _Averaged:
    def __init__(self, owner: SubsetScores, subset: frozenset[int]) -> None:
        self.owner, self.subset = owner, subset
        self.made: list[Path] = []

    def __enter__(self) -> Path:
        owner = self.owner
        files = [owner.members[i] for i in sorted(self.subset)]
        if len(files) == 1 and owner.prepare is None:
            return files[0]
        path = owner.scratch / f"avg-{next(owner._names)}{suffix_of(files[-1])}"
        wavg_combine(files, path, order="given")
        self.made.append(path)
        if owner.prepare is not None:
            path = owner.prepare(path, owner.scratch)
            self.made.append(path)
        return path

    def __exit__(self, *exc: object) -> None:
        for path in self.made:
            path.unlink(missing_ok=True)


@dataclass
class SoupResult:
    """A greedy soup: every member's score, each step, and the soup next to its comparisons."""

    members: list[Path]  # oldest first
    epochs: list[int | None]
    data: str
    metric: str
    higher_is_better: bool
    single_scores: list[float]
    steps: list[SoupStep]
    ingredients: list[int]  # indices into members, oldest first
    soup_score: float
    uniform_score: float
    output: Path
    bn_data: str | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def best_single(self) -> int:
        return rank(self.single_scores, self.higher_is_better)[0]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document (schema ``wavg.soup/1``; keys are stable)."""
        best = self.best_single
        return {
            "schema": SCHEMA,
            "data": self.data,
            "bn_data": self.bn_data,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "checkpoints": [
                {"path": str(self.members[i]), "epoch": self.epochs[i], "score": s}
                for i, s in reversed(list(enumerate(self.single_scores)))
            ],
            "steps": [
                {"candidate": str(self.members[s.candidate]), "score": s.score, "kept": s.kept}
                for s in self.steps
            ],
            "ingredients": [str(self.members[i]) for i in self.ingredients],
            "soup": {"path": str(self.output), "score": self.soup_score},
            "uniform": {"score": self.uniform_score},
            "best_single": {"path": str(self.members[best]), "score": self.single_scores[best]},
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
        }


def soup(
    paths: Sequence[str | os.PathLike[str]],
    data: str | os.PathLike[str] | Dataset | None,
    out: str | os.PathLike[str],
    *,
    metric: str | None = None,
    bn_data: str | os.PathLike[str] | Dataset | None = None,
    batch_size: int = 32,
    model: str | os.PathLike[str] | None = None,
    custom_objects: str | None = None,
    trust: bool = False,
    order: str = "natural",
    on_step: Callable[[SoupStep, Path], None] | None = None,
) -> SoupResult:
    """Choose a greedy soup of `paths` on held-out `data` and write its uniform average.

    `data` is ``"blobs"`` (the case study's validation split, disjoint from its test points)
    or an ``.npz`` whose ``x_test, y_test`` are held out from what you will report on. The
    score is `metric` (default: the model's first compiled metric, else its loss). With
    `bn_data`, every average (and every single checkpoint) has its BatchNorm statistics
    recomputed on that data's ``x_train`` before it is scored, and so does the written soup.
    `on_step(step, candidate_path)` is called after each greedy step. `out` is written
    atomically in the members' format. Raises `WavgError` subclasses for every problem.
    """
    from wavg.averaging.onerun import one_run_warnings

    started = time.perf_counter()
    if not paths:
        raise UsageError("no checkpoints given")
    members = order_checkpoints(paths, order=order)
    out_path = Path(out)
    with tempfile.TemporaryDirectory(prefix="wavg-soup-") as tmp:
        scratch = Path(tmp)
        # combine's checks (inputs, output name and directory) before Keras reads anything.
        wavg_combine(members, out_path, order="given", dry_run=True)
        dataset = data if isinstance(data, Dataset) else load_validation(data)
        net = compiled_model_for(members, dataset, model, custom_objects, trust)
        scorer = Scorer(net, dataset.x_test, dataset.y_test)
        metric = check_metric(metric, scorer.metric_names)
        higher = higher_is_better(metric)
        prepare, bn_name = _recalibration(net, members[-1], bn_data, batch_size)
        scores = SubsetScores(members, scorer, metric, scratch, prepare)
        singles, vectors = [], []
        for i in range(len(members)):
            singles.append(scores.score(frozenset([i])))
            vectors.append(scorer.weight_vector())
        kept, steps = greedy(
            rank(singles, higher),
            scores.score,
            higher,
            None if on_step is None else lambda s: on_step(s, members[s.candidate]),
        )
        uniform = scores.score(frozenset(range(len(members))))
        ingredients = sorted(kept)
        _write_soup([members[i] for i in ingredients], out_path, scratch, prepare)
    return SoupResult(
        members=members,
        epochs=epoch_numbers(members),
        data=dataset.name,
        metric=metric,
        higher_is_better=higher,
        single_scores=singles,
        steps=steps,
        ingredients=ingredients,
        soup_score=scores.score(frozenset(kept)),
        uniform_score=uniform,
        output=out_path,
        bn_data=bn_name,
        seconds=time.perf_counter() - started,
        warnings=one_run_warnings(vectors, members),
    )


def bn_preparer(
    net: Any, like: Path, bn_data: str | os.PathLike[str] | Dataset, batch_size: int = 32
) -> tuple[Prepare | None, str]:
    """A `Prepare` that recomputes BatchNorm statistics on `bn_data`'s ``x_train`` (None when
    the model has no trainable BatchNormalization layer), and the data's name."""
    from wavg.workflows.bn_update import plan_bn_update, recalibrate

    dataset = bn_data if isinstance(bn_data, Dataset) else load_data(bn_data)
    check_inputs_fit(dataset, net.input_shape)
    plan = plan_bn_update(net, like)
    if not plan.layers:
        return None, dataset.name

    def prepare(path: Path, scratch: Path) -> Path:
        out = scratch / f"bn-{path.name}"
        recalibrate(net, plan, path, out, dataset.x_train, batch_size)
        return out

    return prepare, dataset.name


def _recalibration(
    net: Any, like: Path, bn_data: str | os.PathLike[str] | Dataset | None, batch_size: int
) -> tuple[Prepare | None, str | None]:
    if bn_data is None:
        return None, None
    return bn_preparer(net, like, bn_data, batch_size)


def _write_soup(files: list[Path], out: Path, scratch: Path, prepare: Prepare | None) -> None:
    """The uniform average of `files` at `out`, through combine (and `prepare`), atomically."""
    if prepare is None:
        wavg_combine(files, out, order="given")
        return
    from wavg.averaging.rewrite import rewrite_tensors

    average = scratch / f"soup{suffix_of(out)}"
    wavg_combine(files, average, order="given")
    ready = prepare(average, scratch)
    rewrite_tensors(ready, out, {})
