"""Cold start: an asset the model was not fitted on learns its own scaling, then its own alert
level, before it may alert.

A model fitted with per-asset scaling knows each training asset's operating point. A new
asset scaled with the fleet's numbers sits wherever its own operating point falls in the
fleet's units, and its first readings would alert although nothing is wrong. So, over its first
``threshold.cold_start_steps`` steps:

1. **scaling** (the first third): each step is scaled with the asset's running mean and
   standard deviation up to that step (the spread shrunk towards the model's, with the weight
   of :data:`PRIOR_STEPS` steps);
2. **level** (the rest): the score terms restart under the asset's scaling so far and the
   asset calibrates its own per-feature term levels as the fit does (the largest smoothed term
   seen, times the margin, stretched for a short sample, the novelty levels widened for a slow
   feature as the fit widens them), never below the fleet's: the network
   and the cross-sectional map were fitted on other assets, so their errors on this one may
   run higher. The running scaling goes on learning through this part too: frozen after the
   first third, a slowly drifting sensor (a warming pump's temperature) soon left its range.
   The agreement term of such an asset is judged at :data:`OWN_AGREE_LEVEL` (or the fleet's
   agreement level, if higher): see :func:`with_own_levels`.

At the end both are frozen as the asset's own (its scaling kept across model swaps until a
model fitted on the asset takes over). It does not learn on past the cold start: a running
scaling absorbs faults (on unseen SKAB recordings it found 11 faults of 20 instead of 15).

No alert opens during either part; the engine marks those steps ``learning``. Assets the
model knows (or every asset, for a model with one fleet-wide scaling) skip the cold start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.bundle import ModelBundle, ThresholdParams, scale_from
from pipeline.rowwise import row_all
from pipeline.state import FleetState
from pipeline.thresholds import MIN_BATCHES, TermLevels, excursion_factor, feature_quantile, scale_uncertainty_factor

UNDECIDED, KNOWN, COLD = 0, 1, 2
PRIOR_STEPS = 30  # weight, in steps, of the model's own scaling in an asset's learned spread
MAX_DEVIATION = 1e150  # a reading's deviation from the fleet's mean, as the running sums take it (squares < 1e300)
# The agreement level of an asset with levels of its own (see with_own_levels): both terms at those levels.
OWN_AGREE_LEVEL = 1.0


@dataclass(frozen=True)
class ColdPlan:
    """How long each part of a cold start lasts, from the bundle's ``cold_start_steps``."""

    scaling: int
    level: int

    @classmethod
    def of(cls, bundle: ModelBundle) -> ColdPlan:
        total = int(bundle.thresholds.cold_start_steps)
        return cls((total + 2) // 3, total - (total + 2) // 3)

    @property
    def total(self) -> int:
        return self.scaling + self.level


@dataclass
class StepScaling:
    """Per step: the scaling in force and the step's position in its asset's cold start."""

    mean: np.ndarray   # (n, F)
    scale: np.ndarray  # (n, F)
    index: np.ndarray  # int64 (n,): steps since the asset's cold start began, -1 for assets the model knows


def decide(state: FleetState, bundle: ModelBundle, rows: np.ndarray) -> None:
    """Mark assets seen for the first time: known to the model, or in cold start."""
    col = state.cols["cold_start"]
    new = np.unique(rows[col[rows] == UNDECIDED])
    if len(new) == 0:
        return
    names = np.array([state.names[r] for r in new.tolist()], dtype=object)
    known = bundle.scaler.knows(names) | (ColdPlan.of(bundle).total == 0)
    col[new] = np.where(known, KNOWN, COLD)
    state.cols["cold_steps"][new] = 0


def after_swap(state: FleetState, bundle: ModelBundle, rows: np.ndarray | None = None) -> None:
    """A new model: assets it was fitted on drop their learned scaling; assets still unknown to it
    keep their scaling but learn their level afresh (the swap re-seeds every threshold). ``rows``:
    only these assets (restored from snapshots taken under another model); by default all."""
    if rows is None:
        rows = np.array(sorted(state.index.values()), dtype=np.int64)
    cold = rows[state.cols["cold_start"][rows] == COLD]
    if len(cold) == 0:
        return
    names = np.array([state.names[r] for r in cold.tolist()], dtype=object)
    known = bundle.scaler.knows(names) | (ColdPlan.of(bundle).total == 0)
    state.cols["cold_start"][cold[known]] = KNOWN
    state.vectors["own_mean"][cold[known]] = np.nan
    state.vectors["own_scale"][cold[known]] = np.nan
    plan = ColdPlan.of(bundle)
    relearn = cold[~known]
    steps = state.cols["cold_steps"]
    steps[relearn] = np.where(steps[relearn] >= plan.scaling, plan.scaling, steps[relearn])
    for name in ("cold_fc_max", "cold_nv_max", "cold_flat_max"):
        state.vectors[name][relearn] = 0
    for name in ("own_fc_level", "own_nv_level", "own_flat_limit"):  # levels belong to the model they were learned under
        state.vectors[name][cold] = np.nan


def rebaseline(state: FleetState, rows: np.ndarray) -> None:
    """Start these assets' cold start over: their current behaviour becomes their normal (after an
    alert outlasted ``threshold.rebaseline_after_s``). The next model fitted on them takes over."""
    v = state.vectors
    state.cols["cold_start"][rows] = COLD
    state.cols["cold_steps"][rows] = 0
    for name in ("own_count", "own_sum", "own_sq", "cold_fc_max", "cold_nv_max", "cold_flat_max"):
        v[name][rows] = 0
    for name in ("own_mean", "own_scale", "own_fc_level", "own_nv_level", "own_flat_limit"):
        v[name][rows] = np.nan


def row_scaling(state: FleetState, bundle: ModelBundle, rows: np.ndarray, names: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of each row's asset: its learned scaling where it has one, else the bundle's."""
    return with_own_scaling(bundle, names, state.vectors["own_mean"][rows], state.vectors["own_scale"][rows])


def with_own_scaling(bundle: ModelBundle, names: np.ndarray, own_mean: np.ndarray, own_scale: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's scaling of ``names``, replaced by the learned one (rows of ``own_*``) where finite."""
    mean, scale = bundle.scaler.rows_for(names)
    has = row_all(np.isfinite(own_scale))
    if not has.any():
        return mean, scale
    return np.where(has[:, None], own_mean, mean), np.where(has[:, None], own_scale, scale)


def _grouped_cumsum(x: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Cumulative sum along axis 0 restarting at each group start (groups are contiguous).

    Each group is summed on its own: one running sum over all groups, less what came before each,
    let one asset's huge value swamp (or, overflowing, turn into NaN) the sums of every asset
    after it in the poll."""
    if len(starts) <= 1:
        return np.cumsum(x, axis=0)
    import pandas as pd

    group = np.repeat(np.arange(len(starts)), lengths)
    flat = pd.DataFrame(x.reshape(len(x), -1)).groupby(group, sort=False).cumsum().to_numpy(x.dtype)
    return flat.reshape(x.shape)


def step_scaling(state: FleetState, bundle: ModelBundle, rows: np.ndarray, assets: np.ndarray,
                 values: np.ndarray, starts: np.ndarray) -> StepScaling:
    """The scaling of each closed step (steps grouped by asset, in order; ``starts`` = first step
    of each asset's group), advancing each cold asset's running statistics over its whole cold
    start (the scaling in force while levels are learned keeps converging, and is frozen with them)."""
    n = len(rows)
    decide(state, bundle, rows)
    fleet_mean, fleet_scale = bundle.scaler.rows_for(assets)
    cold = state.cols["cold_start"][rows] == COLD
    if not cold.any():
        return StepScaling(fleet_mean, fleet_scale, np.full(n, -1, np.int64))
    lengths = np.diff(np.append(starts, n))
    rank = np.arange(n) - np.repeat(starts, lengths)
    plan = ColdPlan.of(bundle)
    index = np.where(cold, state.cols["cold_steps"][rows] + rank, -1)
    learns = cold & (index < plan.total)
    group_rows = rows[starts]
    in_cold = state.cols["cold_start"][group_rows] == COLD
    state.cols["cold_steps"][group_rows[in_cold]] += lengths[in_cold]
    if not learns.any():  # every cold asset here is past its cold start: its scaling is frozen
        mean, scale = row_scaling(state, bundle, rows, assets)
        return StepScaling(mean, scale, index)
    v = state.vectors
    shift = bundle.scaler.mean  # summing deviations from the fleet's mean keeps the variance exact enough
    ok = np.isfinite(values) & learns[:, None]
    # Bounded so that squares and their sums stay finite: a reading of 1e200 widens the asset's
    # spread for good, but cannot turn its scaling (and with it its network state) into NaN.
    dev = np.where(ok, np.clip(values - shift, -MAX_DEVIATION, MAX_DEVIATION), 0.0)
    cnt = v["own_count"][rows] + _grouped_cumsum(ok.astype(np.int64), starts, lengths)
    s1 = v["own_sum"][rows] + _grouped_cumsum(dev, starts, lengths)
    s2 = v["own_sq"][rows] + _grouped_cumsum(dev**2, starts, lengths)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = s1 / cnt
        sd = np.sqrt(np.maximum(s2 / cnt - m**2, 0.0))
    # Shrunk towards the model's scaling: a feature that barely moved so far must not get a
    # spread near zero, against which any later movement is huge.
    shrunk = np.sqrt((cnt * sd**2 + PRIOR_STEPS * fleet_scale**2) / (cnt + PRIOR_STEPS))
    run_mean = np.where(cnt >= 1, shift + m, fleet_mean)
    run_scale = np.where(cnt >= 2, scale_from(shift + m, shrunk), fleet_scale)
    mean = np.where(cold[:, None], run_mean, fleet_mean)
    scale = np.where(cold[:, None], run_scale, fleet_scale)
    last = np.append(starts[1:], n) - 1
    last = last[cold[last]]
    r = rows[last]
    v["own_count"][r], v["own_sum"][r], v["own_sq"][r] = cnt[last], s1[last], s2[last]
    owns = last[index[last] >= plan.scaling - 1]  # past the first third: the asset's own scaling
    v["own_mean"][rows[owns]], v["own_scale"][rows[owns]] = run_mean[owns], run_scale[owns]
    return StepScaling(mean, scale, index)


@dataclass(frozen=True)
class LevelStretch:
    """What a cold start's largest smoothed terms are multiplied by to make the asset's levels (one
    model's: :meth:`of`), the way the fit calibrates them: the margin, stretched for the few
    independent excursions a short sample holds (:func:`excursion_factor`), and the novelty levels
    widened for the few independent values a slow feature holds in the level part
    (:func:`scale_uncertainty_factor`, with the fit's ``novelty_memory``)."""

    forecast: float
    novelty: np.ndarray | float  # (F,) with the fit's memory of each feature's novelty residual

    @classmethod
    def of(cls, bundle: ModelBundle) -> LevelStretch:
        """Computed when a model is installed, not at an asset's end of cold start: the first call
        imports scipy's quantiles, which stalled that poll (0.6–0.75 s for scipy.stats here)."""
        p, plan = bundle.thresholds, ColdPlan.of(bundle)
        q = feature_quantile(p.quantile, bundle.n_features)
        forecast = p.margin * excursion_factor(plan.level, p.smoothing_alpha, q)
        novelty: np.ndarray | float = p.novelty_margin * excursion_factor(plan.level, p.novelty_alpha, q)
        # The level part attests a memory of at most a tenth of its length, as the fit's estimate of a
        # short history does (MIN_BATCHES): a residual slower than that is judged from as many values
        # as the fit would have judged it, not from one.
        if bundle.novelty_memory is not None:
            memory = np.minimum(bundle.novelty_memory, plan.level / MIN_BATCHES)
            novelty = novelty * scale_uncertainty_factor(plan.level / np.maximum(memory, 1.0), q)
        return cls(forecast, novelty)


def learn_levels(state: FleetState, rows: np.ndarray, index: np.ndarray, levels: TermLevels, p: ThresholdParams,
                 plan: ColdPlan, stretch: LevelStretch) -> np.ndarray:
    """One step of each of ``rows`` (distinct assets), after its score terms advanced: track the
    largest smoothed term per feature over the level part and, at its end, set the asset's own
    levels: the sample's top times ``stretch``, never below the fleet's (``levels``, the rows of
    these steps). Returns which steps are still learning."""
    v = state.vectors
    lv = (index >= plan.scaling) & (index < plan.total)
    r = rows[lv]
    if len(r):
        v["cold_fc_max"][r] = np.fmax(v["cold_fc_max"][r], np.sqrt(np.maximum(v["forecast_ewma"][r], 0.0)))
        v["cold_nv_max"][r] = np.fmax(v["cold_nv_max"][r], np.sqrt(np.maximum(v["novelty_ewma"][r], 0.0)))
        v["cold_flat_max"][r] = np.maximum(v["cold_flat_max"][r], v["flat_run"][r])
    end = index == plan.total - 1
    if end.any():
        e = rows[end]
        shape = (len(rows), v["cold_fc_max"].shape[1])  # levels hold one row for all steps or one per step
        fc_fleet = np.broadcast_to(levels.forecast, shape)[end]
        nv_fleet = np.broadcast_to(levels.novelty, shape)[end]
        flat_fleet = np.broadcast_to(levels.flat, shape)[end]
        v["own_fc_level"][e] = np.maximum(fc_fleet, v["cold_fc_max"][e] * stretch.forecast)
        v["own_nv_level"][e] = np.maximum(nv_fleet, v["cold_nv_max"][e] * stretch.novelty)
        v["own_flat_limit"][e] = np.maximum(flat_fleet, p.flat_factor * v["cold_flat_max"][e])
        # The online threshold statistics start afresh under the asset's own levels.
        state.cols["adapt_mean"][e] = state.cols["adapt_var"][e] = np.nan
    return (index >= 0) & (index < plan.total)


def with_own_levels(levels: TermLevels, state: FleetState, rows: np.ndarray) -> TermLevels:
    """The term levels of each step (rows = the steps' assets), with cold-started assets' own levels.

    Their agreement level is :data:`OWN_AGREE_LEVEL`, both terms at their own levels, unless the
    model's (the fleet's, or a re-baselined asset's own) is higher. The fit calibrates the
    agreement level on held-out steps; a cold start has none, and calibrated on its own level
    part (largest value × margin × stretch, as its other levels are) it came out below the
    fleet's on all 20 unseen SKAB assets, which then opened 6 alerts: levels learned from a few
    hundred steps run low on the steps after them, and the agreement term multiplies two such
    shortfalls."""
    v = state.vectors
    own_fc, own_nv, own_fl = v["own_fc_level"][rows], v["own_nv_level"][rows], v["own_flat_limit"][rows]
    has = row_all(np.isfinite(own_fc)) & row_all(np.isfinite(own_nv)) & row_all(np.isfinite(own_fl))
    if not has.any():
        return levels
    shape = own_fc.shape
    agree = levels.agree
    if agree is not None:
        model = np.broadcast_to(agree, (len(rows), 1))  # the fleet's, or a re-baselined asset's calibrated one
        agree = np.where(has[:, None], np.maximum(model, OWN_AGREE_LEVEL), model)
    return TermLevels(np.where(has[:, None], own_fc, np.broadcast_to(levels.forecast, shape)),
                      np.where(has[:, None], own_nv, np.broadcast_to(levels.novelty, shape)),
                      np.where(has[:, None], own_fl, np.broadcast_to(levels.flat, shape)), agree, levels.alone)
