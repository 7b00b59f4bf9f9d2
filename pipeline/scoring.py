"""Scoring closed grid steps with each asset's LSTM state carried between calls.

All new steps of all assets in one poll go through one batched call: the steps are cut
into segments (one per asset, or more where the grid asked for a reset), padded to the
longest segment and masked. The network predicts the *change* to the next step (so
it carries over to operating levels it saw little of); the score of a step is how far it
is from the prediction made one step earlier, per feature, in units of the error scale
seen at training time:

    e_f   = (x_f - x̂_f) / error_scale_f          (scaled units)
    score = sqrt(mean_f e_f²)                    (reported; alerts use the terms in thresholds.py)

Beside it, the cross-sectional residual ``r_f`` says how far feature f is from what the
other features of the same step predict (a linear map learned at fit time), in units of
its training spread.

Steps within ``warmup_steps`` of a reset advance the state but are not scored, because
a cold LSTM state predicts poorly and would raise false alarms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.bundle import AssetHeads, ModelBundle, unread_mask
from pipeline.grid import GridSteps
from pipeline.model import StepFunction
from pipeline.rowwise import repeated, take_rows
from pipeline.state import FleetState


@dataclass
class ScoredSteps:
    asset: np.ndarray    # object (n,)
    step: np.ndarray     # int64 (n,)
    rows: np.ndarray     # int64 (n,): FleetState row of each step's asset
    score: np.ndarray    # float64 (n,) RMS of the forecast errors, NaN when not scored (warm-up)
    errors: np.ndarray   # float64 (n, F) normalised per-feature forecast errors, NaN when not scored
    novelty: np.ndarray  # float64 (n, F) normalised cross-sectional residuals (no warm-up needed)
    top: np.ndarray      # float32 (n, U) the last LSTM layer's output at each step
    unread: np.ndarray | None = None  # bool (n, F) features the step's scaling does not read; None: all read

    def __len__(self) -> int:
        return len(self.step)


def rank_within_asset(asset: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
    """Position of each step within its asset's run (steps come grouped by asset); ``first``:
    where each run starts, when the caller has it already."""
    if first is None:
        first = segment_bounds(asset, np.zeros(len(asset), bool))
    return np.arange(len(asset)) - np.repeat(first, np.diff(np.append(first, len(asset))))


def segment_bounds(asset: np.ndarray, reset: np.ndarray) -> np.ndarray:
    """Start index of every segment: where the asset changes or the grid asked for a reset."""
    n = len(asset)
    if n == 0:
        return np.empty(0, np.int64)
    starts = np.ones(n, bool)
    starts[1:] = (asset[1:] != asset[:-1]) | reset[1:]
    return np.flatnonzero(starts)


# The model call pads every segment of a poll to the longest: past this many cells per step (plus
# the slack), the assets are scored in groups of similar run lengths instead (see _score_in_buckets).
PAD_FACTOR, PAD_SLACK = 4, 1 << 16


def _score_in_buckets(state: FleetState, model: StepFunction, bundle: ModelBundle, steps: GridSteps,
                      rows: np.ndarray, scaling: tuple[np.ndarray, np.ndarray] | None) -> ScoredSteps:
    """:func:`score_steps` over groups of assets whose runs in this poll differ at most twofold,
    merged back in the steps' order: one asset's 10,000-step backlog among 10,000 assets of one
    step each would otherwise pad 10,000 × 10,000 cells (gigabytes). Each asset's steps stay in
    one group, and assets do not share state, so the results are those of one call."""
    first = segment_bounds(rows, np.zeros(len(rows), bool))
    runs = np.diff(np.append(first, len(rows)))
    bucket = np.repeat(np.log2(runs).astype(np.int64), runs)
    parts = [np.flatnonzero(bucket == b) for b in np.unique(bucket)]
    scored = [score_steps(state, model, bundle, steps.take(idx), rows[idx],
                          None if scaling is None else (scaling[0][idx], scaling[1][idx]), split=False)
              for idx in parts]
    order = np.argsort(np.concatenate(parts), kind="stable")

    def merged(name: str) -> np.ndarray:
        return np.concatenate([getattr(sc, name) for sc in scored])[order]

    unread = None
    if any(sc.unread is not None for sc in scored):
        unread = np.concatenate([np.zeros((len(sc), bundle.n_features), bool) if sc.unread is None else sc.unread
                                 for sc in scored])[order]
    return ScoredSteps(steps.asset, steps.step, rows, merged("score"), merged("errors"), merged("novelty"),
                       merged("top"), unread)


def score_steps(state: FleetState, model: StepFunction, bundle: ModelBundle, steps: GridSteps,
                rows: np.ndarray | None = None, scaling: tuple[np.ndarray, np.ndarray] | None = None, *,
                split: bool = True) -> ScoredSteps:
    """Advance every asset through its new steps in one model call and score each step.

    ``rows`` are the steps' state rows when the caller has them; ``scaling`` the (mean, scale)
    of each step when it is not the bundle's (:mod:`pipeline.cold_start`); ``split=False``: one
    call however much padding it takes (see :data:`PAD_FACTOR`)."""
    n, f = len(steps), bundle.n_features
    rows = state.rows(steps.asset) if rows is None else rows
    if n == 0:
        return ScoredSteps(steps.asset, steps.step, rows, np.empty(0), np.empty((0, f)), np.empty((0, f)),
                           np.empty((0, bundle.units[-1]), np.float32))
    scaled = (scaled_values(bundle, steps.asset, steps.values) if scaling is None
              else scale_values(steps.values, *scaling))

    streaming = n == 1 or bool((rows[1:] != rows[:-1]).all())  # one step of each asset
    if streaming:
        starts = seg_of = last_seg = np.arange(n)
        lengths, pos = np.ones(n, np.int64), np.zeros(n, np.int64)
        seg_rows, seg_reset, n_seg, width = rows, steps.reset, n, 1
    else:  # (an asset's row stands for it: ints compare faster)
        starts = segment_bounds(rows, steps.reset)
        lengths = np.diff(np.append(starts, n))
        seg_rows = rows[starts]
        seg_reset = steps.reset[starts]
        n_seg, width = len(starts), int(lengths.max())
        if split and n_seg * width > PAD_FACTOR * n + PAD_SLACK:  # e.g. one asset's backlog among many one-step assets
            return _score_in_buckets(state, model, bundle, steps, rows, scaling)
        seg_of = np.repeat(np.arange(n_seg), lengths)
        pos = np.arange(n) - starts[seg_of]
        # Each asset's state is carried from its last segment of this poll.
        last_seg = np.flatnonzero(np.append(seg_rows[1:] != seg_rows[:-1], True))
    r = rows if streaming else seg_rows[last_seg]  # each asset's row, once
    every = len(last_seg) == n_seg  # each segment its asset's last (no asset reset within the poll)
    if width == 1 and every:  # one step of each asset (the streaming case): states advance in place
        y, top = model.advance(scaled, state.lstm, seg_rows, seg_reset)
        y, top, x = y[:, None], top[:, None], scaled[:, None]
    else:
        x = np.zeros((n_seg, width, f), np.float32)
        mask = np.zeros((n_seg, width), bool)
        x[seg_of, pos] = scaled
        mask[seg_of, pos] = True
        # float32 copies (a reset segment starts from zero); ``take`` gathers rows faster than indexing
        init = [take_rows(a, seg_rows) for a in state.lstm]
        if seg_reset.any():
            for a in init:
                a[seg_reset] = 0.0
        y, top, final = model(x, mask, init)
        for a, fin in zip(state.lstm, final):
            a[r] = fin if every else fin[last_seg]
    # The network predicts the change to the next step: prediction = current value + change.
    y = predicted_change(bundle, steps.asset if n_seg == n else steps.asset[starts], y, top) + x

    # The prediction for a step was made one step earlier: inside the segment, or carried
    # from the previous poll for a segment's first step.
    carried_ok = ~seg_reset & state.cols["has_pred"][seg_rows]
    if n_seg == n:  # every step its segment's first (the streaming case)
        pred = take_rows(state.last_pred, seg_rows)
        has_pred = carried_ok
    else:
        pred = np.empty((n, f), np.float32)
        first = pos == 0
        pred[~first] = y[seg_of[~first], pos[~first] - 1]
        pred[first] = take_rows(state.last_pred, seg_rows)
        has_pred = ~first | carried_ok[seg_of]
    base = np.where(seg_reset, 0, state.cols["since_reset"][seg_rows])
    since = base if streaming else base[seg_of] + pos
    valid = has_pred & (since >= bundle.warmup_steps)

    errors = np.divide(np.subtract(scaled, pred, out=pred), repeated(bundle.error_scale, n), dtype=np.float64)
    unread = unread_cells(bundle, steps.asset, scaling)
    if unread is not None:  # the network's wobble on a feature it never saw move is no evidence
        errors[unread] = 0.0
    if not valid.all():
        errors[~valid] = np.nan
    score = np.sqrt(np.einsum("ij,ij->i", errors, errors) / f)

    state.cols["has_pred"][r] = True
    if streaming:
        state.last_pred[r] = y[:, 0]
        state.cols["since_reset"][r] = base + 1
        state.cols["last_step"][r] = steps.step
    else:
        state.last_pred[r] = y[last_seg, lengths[last_seg] - 1]
        state.cols["since_reset"][r] = base[last_seg] + lengths[last_seg]
        state.cols["last_step"][r] = steps.step[starts[last_seg] + lengths[last_seg] - 1]
    # Without resets the segments are the assets' runs, so a step's position in its segment is its rank.
    rank = rank_within_asset(rows) if not streaming and steps.reset.any() else pos
    state.remember(rows, steps.values, steps.reset, rank)  # (the ring casts to float32 as it stores)
    novelty = cross_sectional_residuals(bundle, scaled)
    if unread is not None:
        novelty[unread] = 0.0
    return ScoredSteps(steps.asset, steps.step, rows, score, errors, novelty,
                       top[:, 0] if n_seg == n else top[seg_of, pos], unread)


def unread_cells(bundle: ModelBundle, assets: np.ndarray, scaling: tuple[np.ndarray, np.ndarray] | None
                 ) -> np.ndarray | None:
    """Where each step's feature is not read (:func:`pipeline.bundle.scale_from`) under the scaling
    in force, (n, F); None when the bundle reads every feature."""
    if not bundle.scaler.any_unread:
        return None
    return unread_mask(*(bundle.scaler.rows_for(assets) if scaling is None else scaling))


def predicted_change(bundle: ModelBundle, assets: np.ndarray, y: np.ndarray, top: np.ndarray) -> np.ndarray:
    """The change each sequence's asset is predicted to make next, (B, T, F): from its own
    output layer where the bundle has one (``top`` is the last LSTM layer's output, (B, T, U)),
    else the network's."""
    heads = bundle.heads
    if not heads.names:
        return y
    idx = heads.rows(assets)
    own = idx >= 0
    if own.all():  # a fleet the model was fitted on: every row its own layer
        return _own_layers(heads, top, idx).astype(y.dtype, copy=False)  # as the network's (float32)
    if not own.any():
        return y
    y = y.copy()
    mine = np.flatnonzero(own)
    y[mine] = _own_layers(heads, top[mine], idx[mine])
    return y


def _own_layers(heads: AssetHeads, top: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Each row's change from its own output layer (``idx``: rows of ``heads``, none -1)."""
    return np.matmul(top, take_rows(heads.kernel32, idx)) + take_rows(heads.bias32, idx)[:, None, :]


SCALED_LIMIT = 1e3  # standard deviations: far past any reading a model can explain, yet finite in float32


def scaled_values(bundle: ModelBundle, assets: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Readings in the model's units (float32), with the bundle's scaling of each asset."""
    return scale_values(values, *bundle.scaler.rows_for(assets))


def scale_values(values: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Readings standardised (float32), clipped to ±:data:`SCALED_LIMIT`: an absurd but finite
    reading (1e39 overflows float32) must score as a huge error, not turn the asset's carried
    LSTM state into NaN for good."""
    x = np.subtract(values, mean)  # in float64: a level of 1e6 keeps its small moves
    out = np.empty(x.shape, np.float32)
    np.divide(x, scale, out=out, casting="same_kind")  # straight into float32: no second copy
    return np.clip(out, -SCALED_LIMIT, SCALED_LIMIT, out=out)


def novelty_design(scaled: np.ndarray, bounds: np.ndarray | None = None) -> np.ndarray:
    """Regressors of the cross-sectional map: every scaled feature and its square, each feature
    first held inside ``bounds`` (2, F) when given: the range it spanned in training, widened
    by half that range on each side (``fit.NOVELTY_RANGE_MARGIN``). The
    quadratic map is only known where it was fitted: a temperature drifting 17 sd below its
    training range would otherwise drag every other feature's prediction with it, so their
    residuals, alerts and top features too. Held, such a sensor shows only in its own residual
    (the targets are never clipped). Training rows lie inside the bounds, so the fit is
    unchanged."""
    x = np.array(scaled, np.float64)  # contiguous: numpy's loops over rows of 8 cost more than copies
    if bounds is not None:
        lo, hi = repeated(bounds, len(x))
        np.maximum(x, lo, out=x)
        np.minimum(x, hi, out=x)
    return np.concatenate([x, np.square(x)], axis=1)


def cross_sectional_residuals(bundle: ModelBundle, scaled: np.ndarray) -> np.ndarray:
    """How far each scaled feature is from its prediction by the others, in training units."""
    residual = novelty_design(scaled, bundle.novelty_range) @ bundle.novelty_coef
    np.subtract(scaled, residual, out=residual)
    return np.divide(residual, repeated(bundle.novelty_scale, len(residual)), out=residual)
