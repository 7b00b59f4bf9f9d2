"""Drawing for ``plantwatch report``: one figure (PNG) and one self-contained HTML page.

Reliability engineers read a trace faster than JSON, so the figure puts what the detector saw
on one time axis: each sensor standardised by the model's own training scaling (one small
panel per sensor, so a sensor that drove an alert is seen on its own), then the alert score
against its threshold on a log scale, with every alert span shaded across all panels. Each
span is labelled A1, A2, … on the score panel and, in the panel of every feature that drove
it, with that feature's share of the alert. The page embeds the PNG as base64
and lists the same alerts in a table, so it can be mailed or attached to a ticket as one file.

Nothing here reads files or the network: :func:`figure_png` and :func:`html_page` take a
:class:`ReportData` and return bytes and text. The figure is drawn on matplotlib's Agg canvas
directly (no global backend, no display). Long ranges are thinned to a min/max envelope per
pixel column (:func:`envelope`), so a spike of one step still shows at any zoom.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

MAX_PANELS = 12         # more sensors than this share one panel instead of one each
WIDTH_IN = 13.0
PANEL_IN, SCORE_IN, CHROME_IN = 0.85, 2.6, 1.1  # a sensor panel, the score panel, title + axis + legend
MAX_POINTS = 3000       # per drawn line; longer series become a min/max envelope
MIN_SHARE = 0.05        # a feature with a smaller share of an alert is not marked as driving it
MIN_SPAN = 1 / 300      # shortest span drawn, as a fraction of the range: a one-minute alert in a day stays visible
_LABEL_ROWS = 3         # alert labels are staggered over this many heights so neighbours do not overlap
SPAN_COLOUR = "tab:orange"
FOCUS_COLOUR = "tab:purple"
LABEL_COLOUR = "tab:red"


@dataclass(frozen=True)
class AlertRow:
    """One alert as the report shows it (folded from its open, update and close events)."""

    alert_id: str
    start_ms: int
    end_ms: int | None          # None: still open at the end of the range
    peak_score: float
    top_features: tuple[tuple[str, float], ...]  # (feature, share), as AlertEvent.top_features
    reason: str | None = None   # why it closed (recovered, data_gap)
    recorded: bool = False      # taken from the alerts topic, not reproduced by the replay


@dataclass(frozen=True)
class ReportData:
    """Everything the figure and the page show, for one asset over [from_ms, to_ms)."""

    asset: str
    model_version: str
    features: tuple[str, ...]
    from_ms: int
    to_ms: int
    period_ms: int
    step_ms: np.ndarray          # int64 (n,) start of each grid step drawn
    standardised: np.ndarray     # float64 (n, F) grid values in the model's training units
    alert_score: np.ndarray      # float64 (n,)
    threshold: np.ndarray        # float64 (n,)
    forecast_error: np.ndarray   # float64 (n,)
    alerts: tuple[AlertRow, ...]
    settings: Mapping[str, str] = field(default_factory=dict)  # what matters to read the figure, for the page
    focus: str | None = None     # the alert id the report was asked for
    labels: tuple[tuple[int, int], ...] = ()  # labelled abnormal periods of the asset, both ends inclusive


# --------------------------------------------------------------------------- pure helpers


def iso(ms: int | None) -> str:
    """UTC time to the second (to the millisecond where it has one)."""
    if ms is None:
        return "-"
    t = datetime.fromtimestamp(ms / 1000, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{ms % 1000:03d}" if ms % 1000 else "") + "Z"


def duration_text(ms: int) -> str:
    """A duration in its largest sensible unit: 45 s, 12.5 min, 3.2 h, 2.0 d."""
    s = ms / 1000
    if s < 120:
        return f"{s:g} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def envelope(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points that keep every bucket's minimum and maximum, in time order.

    A plain stride would drop a one-step spike; a line through each bucket's extremes draws
    the same ink as the full series at the figure's resolution. NaN buckets stay NaN (gaps).
    """
    n = len(y)
    if n <= max_points:
        return x, y
    buckets = max(1, max_points // 2)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    xs, ys = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        seg = y[a:b]
        finite = np.flatnonzero(np.isfinite(seg))
        if not len(finite):
            xs.append(x[a])
            ys.append(np.nan)
            continue
        lo, hi = finite[np.argmin(seg[finite])], finite[np.argmax(seg[finite])]
        for i in sorted({int(lo), int(hi)}):
            xs.append(x[a + i])
            ys.append(seg[i])
    return np.asarray(xs), np.asarray(ys, np.float64)


def alert_labels(alerts: Sequence[AlertRow]) -> dict[str, str]:
    """Short labels in start order: A1, A2, …"""
    return {a.alert_id: f"A{i}" for i, a in enumerate(sorted(alerts, key=lambda a: (a.start_ms, a.alert_id)), 1)}


def span_bounds(alert: AlertRow, data: ReportData) -> tuple[int, int]:
    """The part of an alert inside the drawn range; an open alert runs to the end of the range."""
    end = alert.end_ms if alert.end_ms is not None else data.to_ms
    start = max(alert.start_ms, data.from_ms)
    shortest = max(data.period_ms, round((data.to_ms - data.from_ms) * MIN_SPAN))
    return start, max(min(end, data.to_ms), start + shortest)


def drivers_of(alert: AlertRow) -> tuple[tuple[str, float], ...]:
    """The alert's top features with at least :data:`MIN_SHARE` of it."""
    return tuple((name, share) for name, share in alert.top_features if share >= MIN_SHARE)


def features_text(top: Sequence[tuple[str, float]]) -> str:
    """``Pressure 31 %, Current 15 %``; features the engine named with no share of the alert are left out."""
    return ", ".join(f"{name} {100 * share:.0f} %" for name, share in top if share >= 0.005) or "-"


def overlaps_label(alert: AlertRow, data: ReportData) -> bool:
    """The alert's span meets a labelled period (labels include their end, alerts do not)."""
    end = alert.end_ms if alert.end_ms is not None else data.to_ms
    return any(alert.start_ms <= b and a < end for a, b in data.labels)


# --------------------------------------------------------------------------- the figure


def figure_png(data: ReportData, *, dpi: int = 100) -> bytes:
    """The report figure as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = _figure(data, Figure, dpi)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_size(n_features: int) -> tuple[float, float]:
    """Width and height in inches: one panel per sensor (up to MAX_PANELS), then the score panel."""
    panels = n_features if n_features <= MAX_PANELS else 1
    return WIDTH_IN, CHROME_IN + PANEL_IN * panels + SCORE_IN


def _figure(data: ReportData, figure_cls: Any, dpi: int) -> Any:
    import matplotlib.dates as mdates

    n_features = len(data.features)
    panels = n_features if n_features <= MAX_PANELS else 1
    heights = [PANEL_IN] * panels + [SCORE_IN]
    fig = figure_cls(figsize=figure_size(n_features), dpi=dpi, layout="constrained")
    axes = fig.subplots(panels + 1, 1, sharex=True, height_ratios=heights)
    t = data.step_ms.astype("datetime64[ms]")
    labels = alert_labels(data.alerts)
    drivers = _drivers(data.alerts)
    if panels == n_features:
        for j, (ax, name) in enumerate(zip(axes[:-1], data.features)):
            _feature_panel(ax, t, data.standardised[:, j], name, name in drivers)
    else:
        _combined_panel(axes[0], t, data.standardised, data.features, drivers)
    score_ax = axes[-1]
    _score_panel(score_ax, t, data)
    for ax in axes:
        _shade(ax, data)
    _annotate(axes, score_ax, data, labels, panels == n_features)
    lo, hi = np.datetime64(data.from_ms, "ms"), np.datetime64(data.to_ms, "ms")
    score_ax.set_xlim(lo, hi)
    locator = mdates.AutoDateLocator(minticks=5, maxticks=12)
    score_ax.xaxis.set_major_locator(locator)
    score_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
    score_ax.set_xlabel("time (UTC)", fontsize=9)
    _legend(fig, score_ax, data)
    n_alerts = len(data.alerts)
    fig.suptitle(f"{data.asset}   {iso(data.from_ms)} → {iso(data.to_ms)}   model {data.model_version}   "
                 f"{n_alerts} alert{'s' * (n_alerts != 1)}", fontsize=11)
    return fig


def _drivers(alerts: Sequence[AlertRow]) -> set[str]:
    return {name for a in alerts for name, _ in drivers_of(a)}


def _feature_panel(ax: Any, t: np.ndarray, z: np.ndarray, name: str, driver: bool) -> None:
    x, y = envelope(t, z)
    ax.plot(x, y, lw=0.7, color="tab:red" if driver else "tab:blue")
    ax.text(0.003, 0.93, name, transform=ax.transAxes, ha="left", va="top", fontsize=8,
            fontweight="bold" if driver else "normal",
            bbox={"boxstyle": "square,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.tick_params(labelsize=7)
    ax.axhline(0.0, color="0.8", lw=0.5, zorder=0)
    _headroom(ax, y, 0.4)


def _combined_panel(ax: Any, t: np.ndarray, z: np.ndarray, names: Sequence[str], drivers: set[str]) -> None:
    for j, name in enumerate(names):
        x, y = envelope(t, z[:, j])
        ax.plot(x, y, lw=1.0 if name in drivers else 0.5, alpha=1.0 if name in drivers else 0.5,
                label=name if name in drivers else None)
    ax.set_ylabel("standardised", fontsize=8)
    if drivers:
        ax.legend(loc="upper left", fontsize=7, ncol=6, framealpha=0.8, title="drove an alert", title_fontsize=7)


def _score_panel(ax: Any, t: np.ndarray, data: ReportData) -> None:
    floor = _log_floor(data)
    for series, style in ((data.forecast_error, {"lw": 0.4, "color": "0.55", "alpha": 0.45,
                                                  "label": "forecast error (RMS)"}),
                          (data.alert_score, {"lw": 1.0, "color": "tab:blue", "label": "alert score"}),
                          (data.threshold, {"lw": 1.0, "ls": "--", "color": "tab:red", "label": "threshold"})):
        x, y = envelope(t, np.where(np.isfinite(series), np.maximum(series, floor), np.nan))
        ax.plot(x, y, **style)
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    _headroom(ax, np.concatenate([data.alert_score, data.threshold, data.forecast_error]), 0.3, floor=floor)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_ylabel("score (1 = calibrated level)", fontsize=8)
    ax.tick_params(labelsize=7)


def _headroom(ax: Any, y: np.ndarray, share: float, floor: float | None = None) -> None:
    """Leave the top ``share`` of the panel free of data, for the alert labels drawn there."""
    finite = y[np.isfinite(y)]
    if floor is not None:
        finite = np.log10(np.maximum(finite, floor))
    if not len(finite):
        return
    lo, hi = float(finite.min()), float(finite.max())
    pad = max(hi - lo, 1e-9)
    lo, hi = lo - 0.08 * pad, hi + pad * share / (1 - share)
    ax.set_ylim(*((10 ** lo, 10 ** hi) if floor is not None else (lo, hi)))


def _legend(fig: Any, score_ax: Any, data: ReportData) -> None:
    """One legend under the figure, so it never covers a trace."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = score_ax.get_legend_handles_labels()[0]
    if any(a.alert_id != data.focus for a in data.alerts):
        handles.append(Patch(color=SPAN_COLOUR, alpha=0.35, label="alert span"))
    if data.focus is not None:
        handles.append(Patch(color=FOCUS_COLOUR, alpha=0.35, label="the alert asked for"))
    if data.labels:
        handles.append(Patch(color=LABEL_COLOUR, alpha=0.8, label="labelled abnormal period"))
    handles.append(Line2D([], [], color="tab:red", lw=1.0, label="sensor with ≥ 5 % of an alert"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)


def _log_floor(data: ReportData) -> float:
    """Scores below this are drawn at it: a log axis cannot show zero, and values far below the
    threshold say nothing more than "normal"."""
    finite = data.alert_score[np.isfinite(data.alert_score) & (data.alert_score > 0)]
    return float(max(1e-3, np.quantile(finite, 0.001) if len(finite) else 1e-3))


def _shade(ax: Any, data: ReportData) -> None:
    for a, b in data.labels:
        if b >= data.from_ms and a < data.to_ms:
            ax.axvspan(np.datetime64(max(a, data.from_ms), "ms"), np.datetime64(min(b, data.to_ms), "ms"),
                       ymin=0.0, ymax=0.05, color=LABEL_COLOUR, alpha=0.8, lw=0)
    for a in data.alerts:
        s, e = span_bounds(a, data)
        focus = a.alert_id == data.focus
        ax.axvspan(np.datetime64(s, "ms"), np.datetime64(e, "ms"), color=FOCUS_COLOUR if focus else SPAN_COLOUR,
                   alpha=0.22 if not a.recorded else 0.1, lw=0, hatch="//" if a.recorded else None)


def _annotate(axes: Sequence[Any], score_ax: Any, data: ReportData, labels: Mapping[str, str],
              per_feature: bool) -> None:
    """A1, A2, … above each span on the score panel; each driver's share in its own panel."""
    ordered = sorted(data.alerts, key=lambda a: (a.start_ms, a.alert_id))
    index = {name: j for j, name in enumerate(data.features)}
    for k, a in enumerate(ordered):
        s, e = span_bounds(a, data)
        mid = np.datetime64((s + e) // 2, "ms")
        height = 0.97 - 0.09 * (k % _LABEL_ROWS)
        score_ax.text(mid, height, labels[a.alert_id], transform=score_ax.get_xaxis_transform(), ha="center",
                      va="top", fontsize=8, fontweight="bold",
                      color="black", clip_on=True)
        if not per_feature:
            continue
        for name, share in drivers_of(a):
            if name in index:
                axes[index[name]].text(mid, 0.93 - 0.22 * (k % _LABEL_ROWS), f"{labels[a.alert_id]} {100 * share:.0f}%",
                                       transform=axes[index[name]].get_xaxis_transform(), ha="center", va="top",
                                       fontsize=7, color="black", clip_on=True,
                                       bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "0.6",
                                             "alpha": 0.85})


# --------------------------------------------------------------------------- the page


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
.sub { color: #555; margin-top: 0; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.focus td { background: #f1e6f7; }
code { font-size: 0.95em; }
"""


def html_page(data: ReportData, png: bytes) -> str:
    """One self-contained page: the figure inline (base64), the alerts table, the settings."""
    e = html.escape
    labels = alert_labels(data.alerts)
    rows = []
    for a in sorted(data.alerts, key=lambda a: (a.start_ms, a.alert_id)):
        end = iso(a.end_ms) if a.end_ms is not None else "open at the end of the range"
        length = duration_text((a.end_ms if a.end_ms is not None else data.to_ms) - a.start_ms)
        note = " (as recorded on the alerts topic; the replay did not reproduce it)" if a.recorded else ""
        focus = ' class="focus"' if a.alert_id == data.focus else ""
        rows.append(
            f"<tr{focus}><td>{e(labels[a.alert_id])}</td>"
            f"<td><code>{e(a.alert_id)}</code>{e(note)}</td><td>{e(iso(a.start_ms))}</td><td>{e(end)}</td>"
            f'<td class="num">{e(length)}</td><td class="num">{a.peak_score:.2f}</td>'
            f"<td>{e(features_text(a.top_features))}</td><td>{e(a.reason or '-')}</td>"
            + (f"<td>{'yes' if overlaps_label(a, data) else 'no'}</td>" if data.labels else "") + "</tr>")
    table = ("<table><thead><tr><th></th><th>alert id</th><th>start</th><th>end</th><th>length</th>"
             "<th>peak score</th><th>top features (share of the alert)</th><th>closed</th>"
             + ("<th>meets a labelled period</th>" if data.labels else "")
             + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>" if rows
             else "<p>No alert in this range.</p>")
    labelled = ("<h2>Labelled abnormal periods</h2><ul>"
                + "".join(f"<li>{e(iso(a))} to {e(iso(b))}</li>" for a, b in data.labels) + "</ul>"
                if data.labels else "")
    settings = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in data.settings.items())
    title = f"{data.asset}: {iso(data.from_ms)} to {iso(data.to_ms)}"
    img = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>plantwatch report: {e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>plantwatch report: {e(data.asset)}</h1>
<p class="sub">{e(iso(data.from_ms))} to {e(iso(data.to_ms))} ({e(duration_text(data.to_ms - data.from_ms))}),
model <code>{e(data.model_version)}</code>, {len(data.alerts)} alert{"s" * (len(data.alerts) != 1)}</p>
<img alt="sensor traces standardised by the model's training scaling, and the alert score against its threshold
with the alert spans shaded" src="data:image/png;base64,{img}">
<h2>Alerts</h2>
{table}
{labelled}
<h2>How to read it</h2>
<p>Top panels: each sensor in units of the model's training standard deviation (0 = its training mean);
red traces are sensors with at least 5 % of an alert, and the label on a span gives that sensor's share of the
alert (its part of the dominating score term, summed over the alert's steps above the threshold). Bottom panel: the alert score (the largest of the per-sensor forecast,
cross-sectional and flatline terms, each in units of its calibrated level), the threshold in force
(1 = calibrated; it adapts slowly to the asset), and the RMS forecast error, on a log scale.
An alert opens after <i>open_after</i> steps above the threshold and closes after <i>close_after</i>
steps below <i>close_ratio</i> × threshold. Shaded spans are alerts (hatched: as recorded on the alerts
topic, where the replay did not reproduce it); a red bar along the bottom of a panel is a labelled
abnormal period.</p>
<h2>Settings</h2>
<table>{settings}</table>
</body>
</html>
"""
