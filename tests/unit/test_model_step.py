"""The one-step call (every stream advances one step) gives the masked sequence model's numbers
bit for bit, and neither compiled call retraces for new batch sizes."""

from __future__ import annotations

import numpy as np

from pipeline.model import StepFunction


def test_stepping_one_step_at_a_time_equals_the_sequence_call(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    rng = np.random.default_rng(3)
    for batch in (1, 7, 300):
        x = rng.normal(size=(batch, 12, b.n_features)).astype(np.float32)
        states = [rng.normal(scale=0.5, size=s.shape).astype(np.float32) for s in model.zero_states(batch)]
        y_seq, top_seq, final_seq = model(x, np.ones((batch, 12), bool), states)
        carried = states
        for t in range(12):
            y, top, carried = model(x[:, t:t + 1], np.ones((batch, 1), bool), carried)
            np.testing.assert_array_equal(y[:, 0], y_seq[:, t])
            np.testing.assert_array_equal(top[:, 0], top_seq[:, t])
        for got, want in zip(carried, final_seq):
            np.testing.assert_array_equal(got, want)
    assert model.tracing_count == 1
    assert model._step_fn.experimental_get_tracing_count() == 1  # the one-step path served the steps


def test_a_masked_single_step_leaves_the_state_untouched(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    states = [np.full(s.shape, 0.25, np.float32) for s in model.zero_states(2)]
    x = np.ones((2, 1, b.n_features), np.float32)
    _, _, final = model(x, np.array([[True], [False]]), states)
    for got, was in zip(final, states):
        np.testing.assert_array_equal(got[1], was[1])
        assert not np.array_equal(got[0], was[0])


def test_weights_set_on_the_model_serve_the_one_step_call_too(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    b = tiny_bundle
    model = StepFunction(b.n_features, b.units, b.weights)
    x = np.ones((3, 1, b.n_features), np.float32)
    before = model(x, np.ones((3, 1), bool), model.zero_states(3))[0]
    model.model.set_weights([w * 0.5 for w in b.weights])  # how an idle network takes a new version
    stepped = model(x, np.ones((3, 1), bool), model.zero_states(3))[0]
    looped = model(np.concatenate([x, x], axis=1), np.array([[True, False]] * 3), model.zero_states(3))[0]
    np.testing.assert_array_equal(stepped[:, 0], looped[:, 0])
    assert not np.array_equal(stepped, before)
