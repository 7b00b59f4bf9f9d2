"""The one-step call (every stream advances one step, on LiteRT) gives the masked sequence
model's numbers (TensorFlow) to float32 rounding, and the sequence call never retraces for new
batch sizes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model import StepFunction


def test_stepping_one_step_at_a_time_equals_the_sequence_call(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    rng = np.random.default_rng(3)
    for batch in (1, 7, 300, 600):  # 300 and 600: full chunks of the interpreter and a padded rest
        x = rng.normal(size=(batch, 12, b.n_features)).astype(np.float32)
        states = [rng.normal(scale=0.5, size=s.shape).astype(np.float32) for s in model.zero_states(batch)]
        y_seq, top_seq, final_seq = model(x, np.ones((batch, 12), bool), states)
        carried = states
        for t in range(12):
            y, top, carried = model(x[:, t:t + 1], np.ones((batch, 1), bool), carried)
            np.testing.assert_allclose(y[:, 0], y_seq[:, t], rtol=0, atol=1e-5)
            np.testing.assert_allclose(top[:, 0], top_seq[:, t], rtol=0, atol=1e-5)
        for got, want in zip(carried, final_seq):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert model.tracing_count == 1
    assert model.step_runtime == "litert"
    assert model._step_call is None  # TensorFlow's one-step call never ran: LiteRT served the steps
    y, top, final = model(np.zeros((0, 1, b.n_features), np.float32), np.ones((0, 1), bool), model.zero_states(0))
    assert y.shape == (0, 1, b.n_features) and [s.shape[0] for s in final] == [0] * len(final)


def test_the_litert_sequence_call_equals_tensorflows_masked_sequence_model(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """Once converted, a multi-step call runs step by step on LiteRT: the same outputs at every
    unmasked step and the same final states as TensorFlow's masked model, holes included."""
    b = tiny_bundle
    on_tf = StepFunction(b.n_features, b.units, b.weights)  # never stepped: nothing converted yet
    on_lite = StepFunction(b.n_features, b.units, b.weights)
    on_lite.warm_up()
    rng = np.random.default_rng(11)
    for batch, width in ((1, 5), (7, 12), (600, 3)):  # 600: a full interpreter chunk and a padded rest
        x = rng.normal(size=(batch, width, b.n_features)).astype(np.float32)
        mask = rng.random((batch, width)) < 0.7
        mask[:, width // 2:] |= np.arange(batch)[:, None] % 2 == 0  # some streams have no holes late on
        mask[0] = True
        states = [rng.normal(scale=0.5, size=s.shape).astype(np.float32) for s in on_tf.zero_states(batch)]
        y_tf, top_tf, final_tf = on_tf(x, mask, states)
        y, top, final = on_lite(x, mask, states)
        np.testing.assert_allclose(y[mask], y_tf[mask], rtol=0, atol=1e-5)
        np.testing.assert_allclose(top[mask], top_tf[mask], rtol=0, atol=1e-5)
        for got, want in zip(final, final_tf):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert on_lite._seq_call is None and on_tf._seq_call is not None  # which runtime served which
    silent = on_lite(x, np.zeros_like(mask), states)[2]  # no step at all: the states stay
    for got, was in zip(silent, states):
        np.testing.assert_array_equal(got, was)


def test_each_stream_of_a_chunked_step_keeps_its_own_state(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, 1, b.n_features)).astype(np.float32)
    states = [rng.normal(scale=0.5, size=s.shape).astype(np.float32) for s in model.zero_states(600)]
    whole = model(x, np.ones((600, 1), bool), states)
    for lo, hi in ((0, 1), (255, 258), (511, 600)):  # streams alone give what they gave among all
        part = model(x[lo:hi], np.ones((hi - lo, 1), bool), [s[lo:hi] for s in states])
        np.testing.assert_array_equal(part[0], whole[0][lo:hi])
        for got, want in zip(part[2], whole[2]):
            np.testing.assert_array_equal(got, want[lo:hi])


def test_a_masked_single_step_leaves_the_state_untouched(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    states = [np.full(s.shape, 0.25, np.float32) for s in model.zero_states(2)]
    x = np.ones((2, 1, b.n_features), np.float32)
    _, _, final = model(x, np.array([[True], [False]]), states)
    for got, was in zip(final, states):
        np.testing.assert_array_equal(got[1], was[1])
        assert not np.array_equal(got[0], was[0])


def test_new_weights_serve_the_one_step_call_too(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    x = np.ones((3, 1, b.n_features), np.float32)
    before = model(x, np.ones((3, 1), bool), model.zero_states(3))[0]
    model.set_weights([w * 0.5 for w in b.weights])  # how an idle network takes a new version
    stepped = model(x, np.ones((3, 1), bool), model.zero_states(3))[0]
    looped = model(np.concatenate([x, x], axis=1), np.array([[True, False]] * 3), model.zero_states(3))[0]
    np.testing.assert_allclose(stepped[:, 0], looped[:, 0], rtol=0, atol=1e-5)
    assert not np.array_equal(stepped, before)


@pytest.fixture
def conversion_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteRT cannot take the one-step call (e.g. an op the converter lacks)."""
    def refuse(self: StepFunction) -> bytes:
        raise RuntimeError("an op the converter lacks")

    monkeypatch.setattr(StepFunction, "_convert_step", refuse)


def test_the_one_step_call_stays_on_tensorflow_when_conversion_fails(tiny_bundle, conversion_fails) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    x = np.random.default_rng(2).normal(size=(5, 1, b.n_features)).astype(np.float32)
    stepped = model(x, np.ones((5, 1), bool), model.zero_states(5))
    looped = model(np.concatenate([x, x], axis=1), np.array([[True, False]] * 5), model.zero_states(5))
    assert model.step_runtime == "tensorflow"
    np.testing.assert_array_equal(stepped[0][:, 0], looped[0][:, 0])  # TensorFlow both ways: bit for bit


def _advance_against_the_call(model: StepFunction, n_features: int, seed: int) -> None:
    """``advance`` on rows of fleet arrays gives, row for row, what gathering them, calling and
    scattering gives; rows it was not given keep their state."""
    rng = np.random.default_rng(seed)
    capacity, n = 1500, 1100  # two full interpreter chunks and a padded rest
    fleet = [rng.normal(scale=0.5, size=(capacity, s.shape[1])).astype(np.float32) for s in model.zero_states(1)]
    rows = rng.permutation(capacity)[:n]
    zero = rng.random(n) < 0.1  # assets the grid restarted: their state starts from zero
    x = rng.normal(size=(n, n_features)).astype(np.float32)
    init = [a[rows] for a in fleet]
    for a in init:
        a[zero] = 0.0
    y_want, top_want, final_want = model(x[:, None], np.ones((n, 1), bool), init)
    before = [a.copy() for a in fleet]
    y, top = model.advance(x, fleet, rows, zero)
    np.testing.assert_array_equal(y, y_want[:, 0])
    np.testing.assert_array_equal(top, top_want[:, 0])
    untouched = np.setdiff1d(np.arange(capacity), rows)
    for a, was, want in zip(fleet, before, final_want):
        np.testing.assert_array_equal(a[rows], want)
        np.testing.assert_array_equal(a[untouched], was[untouched])


def test_advancing_rows_in_place_equals_gathering_calling_and_scattering(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    _advance_against_the_call(model, b.n_features, seed=7)
    assert model.step_runtime == "litert"


def test_advancing_rows_in_place_on_tensorflow_too(tiny_bundle, conversion_fails) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    _advance_against_the_call(model, b.n_features, seed=8)
    assert model.step_runtime == "tensorflow"
