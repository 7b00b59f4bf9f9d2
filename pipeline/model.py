"""The stacked LSTM that predicts the change to the next grid step, in its two shapes.

* The **training model** is stateful with a fixed batch of S parallel streams
  (``Input(batch_shape=(S, T, F))``): ``fit`` carries each stream's state from one
  T-step window to the next, which is truncated back-propagation through time. The
  network therefore learns under the same carried state it sees in production.
* The **inference model** has the same layers and weights but takes the LSTM states
  as inputs and returns them, plus a step mask: any number of assets, each with any
  number of new steps, are scored in one call, and each asset's ``(h, c)`` is carried
  between calls by the caller. Masked (padding) steps leave the state untouched, so
  chunked and whole-sequence feeding give the same outputs.

Layers are built from code and weights travel as plain arrays: loading a bundle never
deserialises code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.rowwise import take_rows

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """TensorFlow's native start-up lines are written before its log level applies; keep
    them out of the JSON log stream. Python exceptions are unaffected."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _load_lite_runtime() -> None:
    """LiteRT prints a notice on native stderr when a process creates its first interpreter:
    create one here, while the start-up lines are silenced, rather than later in a daemon whose
    other threads write their logs to stderr."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        probe = tf.function(lambda x: x + 1.0, input_signature=[tf.TensorSpec((1,), tf.float32)])
        content = tf.lite.TFLiteConverter.from_concrete_functions([probe.get_concrete_function()]).convert()
        Interpreter(model_content=content).allocate_tensors()
    except Exception:  # no LiteRT here: StepFunction's one-step call stays on TensorFlow (step_runtime)
        return


with _native_stderr_silenced():
    import keras
    import tensorflow as tf

    tf.constant(0.0) + 1.0  # the first op prints the CPU-feature notice; let it happen here
    _load_lite_runtime()


def build_training_model(n_features: int, units: Sequence[int], streams: int, timesteps: int,
                         learning_rate: float, seed: int) -> keras.Model:
    """Stateful stacked LSTM for truncated-BPTT training, next-step targets, MSE loss."""
    keras.utils.set_random_seed(seed)
    x = keras.Input(batch_shape=(streams, timesteps, n_features), name="x")
    h = x
    for i, u in enumerate(units):
        h = keras.layers.LSTM(u, return_sequences=True, stateful=True, name=f"lstm{i}")(h)
    y = keras.layers.Dense(n_features, name="head")(h)
    model = keras.Model(x, y)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, clipnorm=1.0), loss="mse")
    return model


def reset_training_state(model: keras.Model) -> None:
    """Zero the carried state of every stream (Keras 3 has no Model.reset_states)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.LSTM):
            layer.reset_state()


def build_inference_model(n_features: int, units: Sequence[int]) -> keras.Model:
    """Stateless twin of the training model: ``[x, mask, h0, c0, h1, c1, …] -> [y, top, h0', c0', …]``
    where ``top`` is the last LSTM layer's output sequence (what per-asset heads read)."""
    x = keras.Input((None, n_features), name="x")
    mask = keras.Input((None,), dtype="bool", name="mask")
    states_in, states_out = [], []
    h = x
    for i, u in enumerate(units):
        hi, ci = keras.Input((u,), name=f"h{i}"), keras.Input((u,), name=f"c{i}")
        states_in += [hi, ci]
        h, ho, co = keras.layers.LSTM(u, return_sequences=True, return_state=True, name=f"lstm{i}")(
            h, mask=mask, initial_state=[hi, ci])
        states_out += [ho, co]
    y = keras.layers.Dense(n_features, name="head")(h)
    return keras.Model([x, mask, *states_in], [y, h, *states_out])


LITE_CHUNK = 512  # streams per LiteRT call: its cost per stream is flat from about 128 streams up
LITE_GRAIN = 64   # a shorter call is padded to a multiple of this (to a power of two below it)
# A multi-step call runs on LiteRT step by step: for (64, 32) layers a catch-up of 2-3 steps was
# 2.9-3.6x faster than TensorFlow's sequence model (1 to 10,000 streams), 16 steps of 1,000
# streams 1.7x, and with the states advanced in place 1.2-1.5x on every shape tried, long and
# narrow ones too (one stream's 1,000 steps 26.8 against 36.8 ms, 200 steps of 10 streams 7.4
# against 10.6, 4 steps of 5,000 streams 16.4 against 26.9).


def lite_size(streams: int) -> int:
    """Streams an interpreter is planned for when a call has ``streams`` (≤ LITE_CHUNK) of them."""
    if streams <= LITE_GRAIN:
        return 1 << (streams - 1).bit_length()
    return -(-streams // LITE_GRAIN) * LITE_GRAIN


class LiteStep:
    """The one-step cell model converted to LiteRT (TensorFlow's own converter) and run by its
    interpreter: the same float32 arithmetic as the TensorFlow step to about 1e-7, in 0.77 ms for
    1,000 streams against 1.5-1.7 ms, and 9 µs against 420 µs for one stream (most of a
    TensorFlow call is its dispatch). An interpreter has fixed shapes; streams go in chunks of
    :data:`LITE_CHUNK`, the last padded by :func:`lite_size`, one interpreter per size used (at
    most 14, each about 1 MB or less), so a call never re-plans its buffers.
    """

    def __init__(self, content: bytes, threads: int) -> None:
        self._content = content
        self._threads = threads
        self._by_size: dict[int, tuple[Any, list[int], list[int]]] = {}

    def _interpreter(self, size: int) -> tuple[Any, list[int], list[int]]:
        if size not in self._by_size:
            from ai_edge_litert.interpreter import Interpreter

            it = Interpreter(model_content=self._content, num_threads=self._threads)
            runner = it.get_signature_runner()
            ins, outs = runner.get_input_details(), runner.get_output_details()
            del runner  # it holds the interpreter's buffers, which resizing needs free
            names = ["x"] + sorted((k for k in ins if k != "x"), key=lambda k: int(k.rsplit("_", 1)[1]))
            for k in names:
                shape = list(ins[k]["shape_signature"])
                it.resize_tensor_input(ins[k]["index"], [size, *shape[1:]])
            it.allocate_tensors()
            order = sorted(outs, key=lambda k: int(k.rsplit("_", 1)[1]))
            self._by_size[size] = (it, [ins[k]["index"] for k in names], [outs[k]["index"] for k in order])
        return self._by_size[size]

    def __call__(self, x: np.ndarray, states: Sequence[np.ndarray]) -> list[np.ndarray]:
        """[predicted change, last layer's output, h0', c0', …] for one step of every stream."""
        final = [np.array(s, np.float32) for s in states]
        y, top = self.advance(x, final, np.arange(len(x)), np.zeros(len(x), bool))
        return [y, top, *final]

    def sequence(self, x: np.ndarray, mask: np.ndarray, states: Sequence[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """The masked sequence call, one interpreter step per time step over the streams whose
        step it is: (predicted change, last layer's output, each (n, T, ·); final states). A
        masked step leaves its stream's state as it was and its outputs zero."""
        n, width = mask.shape
        final = [np.array(s, np.float32) for s in states]
        y = top = np.empty(0, np.float32)
        every, no_zero = np.arange(n), np.zeros(n, bool)
        for k in range(width):
            on = mask[:, k]
            rows = every if on.all() else np.flatnonzero(on)
            if not len(rows):
                continue
            yk, tk = self.advance(x[:, k] if rows is every else x[rows, k], final, rows, no_zero[:len(rows)])
            if not len(y):
                y = np.zeros((n, width, yk.shape[1]), np.float32)
                top = np.zeros((n, width, tk.shape[1]), np.float32)
            y[rows, k] = yk
            top[rows, k] = tk
        return y, top, final

    def advance(self, x: np.ndarray, states: Sequence[np.ndarray], rows: np.ndarray,
                zero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step of the streams whose states are the distinct ``rows`` of ``states`` (zero
        where ``zero``), written back in place: (predicted change, last layer's output). The
        states go straight between the fleet's arrays and the interpreter's buffers, two copies
        of every state fewer than gathering, calling and scattering."""
        n = len(x)
        y = top = np.empty(0, np.float32)
        any_zero = bool(zero.any())
        for start in range(0, n, LITE_CHUNK):
            part = min(LITE_CHUNK, n - start)
            r = rows[start:start + part]
            it, ins, outs = self._interpreter(lite_size(part))
            # Through views of the interpreter's own buffers; no view may be held while it runs.
            buf = it.tensor(ins[0])()
            buf[:part] = x[start:start + part]
            buf[part:] = 0.0
            for index, a in zip(ins[1:], states):
                buf = it.tensor(index)()
                take_rows(a, r, out=buf[:part])
                if any_zero:
                    buf[:part][zero[start:start + part]] = 0.0
                buf[part:] = 0.0
            del buf
            it.invoke()
            if start == 0:
                y = np.empty((n, it.tensor(outs[0])().shape[1]), np.float32)
                top = np.empty((n, it.tensor(outs[1])().shape[1]), np.float32)
            y[start:start + part] = it.tensor(outs[0])()[:part]
            top[start:start + part] = it.tensor(outs[1])()[:part]
            for index, a in zip(outs[2:], states):
                a[r] = it.tensor(index)()[:part]
        return y, top


def _interpreter_threads() -> int:
    """The threads TensorFlow's operations were given (``detector.tf_threads``; 0 = one per core)."""
    return tf.config.threading.get_intra_op_parallelism_threads() or (os.cpu_count() or 1)


class StepFunction:
    """Compiled calls that advance many streams by any number of steps.

    The input signatures have ``None`` batch (and time) dimensions, so each is traced once
    and never again, whatever the poll size. A call where every stream advances exactly one
    step (the streaming case) runs the LSTM cells once (no time loop), converted to LiteRT on
    its first use (:class:`LiteStep`, about 0.2 s; :meth:`warm_up` does it before serving).
    Once converted, a multi-step call runs it step by step too (:meth:`LiteStep.sequence`); a
    call before the conversion, and every call of a network whose weights changed since (a
    fit's epochs), goes through the masked sequence model. Both give the same numbers to about
    1e-7 (float32 rounding of the two runtimes). Where the conversion fails, the one-step call
    stays on TensorFlow (``step_runtime`` says which serves it).
    """

    def __init__(self, n_features: int, units: Sequence[int], weights: Sequence[np.ndarray]) -> None:
        self.n_features = n_features
        self.units = tuple(units)
        self.model = build_inference_model(n_features, units)
        self.model.set_weights(list(weights))
        # The one-step call runs the model's own cells and head (same variables: weights set on
        # self.model serve it too).
        self._cells = [self.model.get_layer(f"lstm{i}").cell for i in range(len(self.units))]
        self._head = self.model.get_layer("head")
        states = [tf.TensorSpec((None, u), tf.float32) for u in self.units for _ in range(2)]
        signature = [tf.TensorSpec((None, None, n_features), tf.float32), tf.TensorSpec((None, None), tf.bool)]
        self._fn = tf.function(self._call, input_signature=signature + states, reduce_retracing=True)
        self._step_fn = tf.function(self._step, input_signature=[tf.TensorSpec((None, n_features), tf.float32),
                                                                 *states])
        # Called through their concrete functions: the tf.function's own dispatch (binding the
        # arguments, matching the signature) cost about 0.4 ms a call here, a fifth of a
        # 1,000-asset step and most of a one-asset one.
        self._seq_call: Any = None
        self._step_call: Any = None
        self._lite: LiteStep | None = None
        self.step_runtime = "litert"

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Serve other weights of the same shapes (an idle network taking a new version)."""
        self.model.set_weights(list(weights))
        self._lite = None

    def _one_step_runtime(self) -> None:
        """Convert the one-step call to LiteRT on first use (or settle on TensorFlow)."""
        if self._lite is None and self.step_runtime == "litert":
            try:
                self._lite = LiteStep(self._convert_step(), _interpreter_threads())
            except Exception:  # an op LiteRT lacks, or no interpreter: TensorFlow gives the same numbers
                self.step_runtime = "tensorflow"

    def _one_step(self, x: np.ndarray, states: list[np.ndarray]) -> list[np.ndarray]:
        self._one_step_runtime()
        if self._lite is not None and len(x):  # (an empty call goes to TensorFlow: it knows its shapes)
            return self._lite(x, states)
        if self._step_call is None:
            self._step_call = self._step_fn.get_concrete_function()
        tensors = [tf.convert_to_tensor(a, tf.float32) for a in [x, *states]]
        return [t.numpy() for t in self._step_call(*tensors)]

    def _convert_step(self) -> bytes:
        """The one-step call for LiteRT, from the serving weights: Keras's cell, converted as it
        is, makes two matrix products a layer (input and carried output) and adds them and the
        bias in two more operations; here the two are one product of the concatenated input and
        output with the stacked kernels and the bias (about 8 % less interpreter time for 1,000
        streams; the same gates in Keras's order, i, f, c, o, to about 1e-7)."""
        layers = [(tf.constant(np.vstack([np.asarray(c.kernel), np.asarray(c.recurrent_kernel)])),
                   tf.constant(np.asarray(c.bias))) for c in self._cells]
        head_kernel, head_bias = tf.constant(np.asarray(self._head.kernel)), tf.constant(np.asarray(self._head.bias))

        def step(x: tf.Tensor, *states: tf.Tensor) -> list[tf.Tensor]:
            h, out = x, []
            for i, (kernel, bias) in enumerate(layers):
                z = tf.matmul(tf.concat([h, states[2 * i]], 1), kernel) + bias
                zi, zf, zg, zo = tf.split(z, 4, axis=1)
                c = tf.sigmoid(zf) * states[2 * i + 1] + tf.sigmoid(zi) * tf.tanh(zg)
                h = tf.sigmoid(zo) * tf.tanh(c)
                out += [h, c]
            return [tf.matmul(h, head_kernel) + head_bias, h, *out]

        fn = tf.function(step, input_signature=self._step_fn.input_signature)
        return bytes(tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], tf.Module()).convert())

    def _call(self, x: tf.Tensor, mask: tf.Tensor, *states: tf.Tensor) -> list[tf.Tensor]:
        return self.model([x, mask, *states], training=False)

    def _step(self, x: tf.Tensor, *states: tf.Tensor) -> list[tf.Tensor]:
        h, out = x, []
        for i, cell in enumerate(self._cells):
            h, (ho, co) = cell(h, [states[2 * i], states[2 * i + 1]], training=False)
            out += [ho, co]
        return [self._head(h), h, *out]

    def advance(self, x: np.ndarray, states: Sequence[np.ndarray], rows: np.ndarray, zero: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """One step of every stream (``x`` is (n, F)), whose states are the distinct ``rows`` of
        the arrays ``states`` (a zero state where ``zero``), advanced in place: (predicted
        change, last layer's output), each (n, ·). The streaming call: on LiteRT the states
        never leave for a copy of their own."""
        self._one_step_runtime()
        if self._lite is not None and len(x):
            return self._lite.advance(np.asarray(x, np.float32), states, rows, zero)
        init = [take_rows(a, rows) for a in states]
        for a in init:
            a[zero] = 0.0
        out = self._one_step(np.asarray(x, np.float32), init)
        for a, fin in zip(states, out[2:]):
            a[rows] = fin
        return out[0], out[1]

    def __call__(self, x: np.ndarray, mask: np.ndarray, states: Sequence[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(predicted change per step, last layer's output per step, final states)."""
        if x.shape[1] == 1 and mask.all():
            out = self._one_step(np.asarray(x[:, 0], np.float32), [np.asarray(s, np.float32) for s in states])
            return out[0][:, None], out[1][:, None], out[2:]
        if self._lite is not None and mask.any():
            return self._lite.sequence(np.asarray(x, np.float32), mask, states)
        tensors = [tf.convert_to_tensor(s, tf.float32) for s in states]
        if self._seq_call is None:
            self._seq_call = self._fn.get_concrete_function()
        out = self._seq_call(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(mask, tf.bool), *tensors)
        return out[0].numpy(), out[1].numpy(), [s.numpy() for s in out[2:]]

    def zero_states(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, u), np.float32) for u in self.units for _ in range(2)]

    def warm_up(self, batch_sizes: Sequence[int] = (1, 64)) -> None:
        """Trace and run once so the first real poll pays no compilation."""
        for b in batch_sizes:
            self(np.zeros((b, 1, self.n_features), np.float32), np.ones((b, 1), bool), self.zero_states(b))
            self(np.zeros((b, 2, self.n_features), np.float32), np.ones((b, 2), bool), self.zero_states(b))

    @property
    def tracing_count(self) -> int:
        """Traces of the most traced compiled call (1 = none ever retraced)."""
        return max(int(self._fn.experimental_get_tracing_count()), int(self._step_fn.experimental_get_tracing_count()))
