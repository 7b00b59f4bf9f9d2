"""A bundle's training report, for people: the loss curves and the gate's comparison, as JSON
(``report.json``) and as a figure (``report.png``), stored beside the bundle in the registry.

Both are built from the bundle's own metadata (what :func:`~pipeline.fit.fit_stream` and the
training job recorded), so a report can be rebuilt for any bundle. The figure is drawn with
matplotlib's Agg canvas directly: no global backend is chosen, no display is needed.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from pipeline.bundle import REPORT_JSON, REPORT_PNG, ModelBundle

_TRAINING_KEYS = ("epochs", "best_epoch", "train_loss", "val_loss", "validation_error", "initial_val_loss",
                  "fine_tuned_from", "train_steps", "holdout_steps", "duration_s", "created_at",
                  "unread_features", "two_valued_features")


def report(bundle: ModelBundle) -> dict[str, Any]:
    """The report as a JSON-able dict: training figures and the gate's decision with its intervals."""
    meta = bundle.metadata
    return {"version": bundle.version,
            "training": {k: meta.get(k) for k in _TRAINING_KEYS if k in meta},
            "gate": meta.get("gate")}


def warn_features(log: Any, bundle: ModelBundle) -> None:
    """Point out features the model does not read (they never moved in training:
    :func:`pipeline.bundle.scale_from`), and two-valued ones, which look like flags: a command or
    mode channel is better left out of ``model.features`` (README, *Command and mode channels*)."""
    meta = bundle.metadata
    unread = meta.get("unread_features") or {}
    if unread:
        log.warning("features constant in training are not read: their later movement opens no alert",
                    unread=unread)
    flags = meta.get("two_valued_features") or []
    if flags:
        log.warning("features with two values in training look like flags: if the plant's control sets them "
                    "(commands, modes), leave them out of model.features", features=flags)


def report_files(bundle: ModelBundle) -> dict[str, bytes]:
    """``report.json`` and ``report.png`` for :func:`pipeline.registry.publish` / ``store_candidate``."""
    body = report(bundle)
    return {REPORT_JSON: json.dumps(body, indent=2, sort_keys=True, allow_nan=False).encode(),
            REPORT_PNG: figure_png(body)}


def figure_png(body: dict[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, error_ax, alert_ax = fig.subplots(1, 3, width_ratios=(1.4, 1, 1))
    _losses(loss_ax, body.get("training") or {})
    gate = body.get("gate") or {}
    paired = gate.get("paired") if isinstance(gate, dict) else None
    if paired:
        _interval(error_ax, paired.get("error_change"), paired.get("error_allowed"), 100.0,
                  "forecast error change (%)\n(challenger − champion) / champion")
        _interval(alert_ax, paired.get("alert_change"), paired.get("alert_allowed"), 100.0,
                  "alert fraction change (percentage points)")
    else:
        for ax in (error_ax, alert_ax):
            ax.set_axis_off()
        text = gate.get("reason") if isinstance(gate, dict) and gate else "no gate decision recorded"
        error_ax.text(0.0, 0.5, _wrap(f"gate: {text}", 60), transform=error_ax.transAxes, va="center", fontsize=9)
    verdict = gate.get("decision") if isinstance(gate, dict) and gate else None
    fig.suptitle(f"{body.get('version')}" + (f": {verdict}" if verdict else ""), fontsize=11,
                 color={"refuse": "firebrick", "publish": "darkgreen"}.get(verdict or "", "black"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _losses(ax: Any, training: dict[str, Any]) -> None:
    train, val = training.get("train_loss") or [], training.get("val_loss") or []
    epochs = range(1, max(len(train), len(val)) + 1)
    if train:
        ax.plot(epochs[:len(train)], train, marker=".", label="training loss")
    if val:
        ax.plot(epochs[:len(val)], val, marker=".", label="validation error")
    start = training.get("initial_val_loss")
    if isinstance(start, (int, float)) and math.isfinite(start):
        ax.plot([0], [start], marker="s", linestyle="none", color="gray",
                label=f"start: {training.get('fine_tuned_from') or 'initial weights'}")
    best = training.get("best_epoch")
    if isinstance(best, int):
        ax.axvline(best, color="gray", linestyle=":", label=f"best epoch {best}")
    ax.set_xlabel("epoch")
    ax.set_yscale("log" if train and min(train + val) > 0 else "linear")
    ax.set_title("training", fontsize=10)
    if train or val:
        ax.legend(fontsize=8)


def _interval(ax: Any, change: dict[str, Any] | None, allowed: float | None, scale: float, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_yticks([])
    ax.axvline(0.0, color="black", linewidth=0.8)
    if allowed is not None:
        ax.axvline(allowed * scale, color="firebrick", linestyle="--", label="refused if the interval is right of this")
    if not change or any(change.get(k) is None for k in ("estimate", "low", "high")):
        ax.text(0.5, 0.5, "undefined", transform=ax.transAxes, ha="center")
        return
    est, low, high = (change[k] * scale for k in ("estimate", "low", "high"))
    ax.errorbar([est], [0], xerr=[[est - low], [high - est]], fmt="o", capsize=6, color="tab:blue",
                label="estimate, 95 % interval")
    ax.set_ylim(-1, 1)
    ax.legend(fontsize=8, loc="upper left")


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])
