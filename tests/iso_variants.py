"""One instant written in every ISO 8601 form a producer may send (the decoder must read them all alike)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

VARIANTS: tuple[str, ...] = (
    "z", "z_lower", "utc_offset", "minus_zero", "offset", "offset_basic", "offset_hours", "unicode_minus",
    "naive", "space", "micro", "nano", "comma", "no_fraction", "minutes", "hours", "date_only",
    "basic", "basic_no_fraction", "week", "week_basic", "ordinal", "ordinal_basic", "end_of_day", "padded",
    "fraction_of_minute", "fraction_of_hour",
)
"""Forms that cannot write every instant exactly (``no_fraction``, ``minutes``, ``date_only``,
``end_of_day``, the fractions of a minute or an hour…) give ``None`` for the others."""


def _date(d: datetime) -> str:
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}"


def _clock(d: datetime, sep: str = ":") -> str:
    return f"{d.hour:02d}{sep}{d.minute:02d}{sep}{d.second:02d}"


def _offset(minutes: int, sep: str = ":", minus: str = "-") -> str:
    sign = "+" if minutes >= 0 else minus
    h, m = divmod(abs(minutes), 60)
    return f"{sign}{h:02d}{sep}{m:02d}"


def _decimal(numerator: int, denominator: int) -> str | None:
    """numerator / denominator (< 1) as the digits after the decimal mark, if they end."""
    digits = ""
    for _ in range(12):
        if numerator == 0:
            return digits or "0"
        numerator *= 10
        digits += str(numerator // denominator)
        numerator %= denominator
    return None


def render(ms: int, variant: str, offset_minutes: int = 330) -> str | None:
    """``ms`` (epoch milliseconds) in the form ``variant``; ``offset_minutes`` for the offset forms
    (|offset| < 24 h). ``None`` when the form cannot write this instant exactly."""
    utc = EPOCH + timedelta(milliseconds=ms)
    frac = ms % 1000
    local = utc + timedelta(minutes=offset_minutes)
    if variant == "z":
        return f"{_date(utc)}T{_clock(utc)}.{frac:03d}Z"
    if variant == "z_lower":
        return f"{_date(utc)}t{_clock(utc)}.{frac:03d}z"
    if variant == "utc_offset":
        return f"{_date(utc)}T{_clock(utc)}.{frac:03d}+00:00"
    if variant == "minus_zero":
        return f"{_date(utc)}T{_clock(utc)}.{frac:03d}-00:00"
    if variant == "offset":
        return f"{_date(local)}T{_clock(local)}.{frac:03d}{_offset(offset_minutes)}"
    if variant == "offset_basic":
        return f"{_date(local)}T{_clock(local)}.{frac:03d}{_offset(offset_minutes, sep='')}"
    if variant == "offset_hours":
        if offset_minutes % 60:
            return None
        return f"{_date(local)}T{_clock(local)}.{frac:03d}{_offset(offset_minutes)[:3]}"
    if variant == "unicode_minus":  # ISO 8601 writes a negative offset with U+2212
        west = -abs(offset_minutes) or -60
        there = utc + timedelta(minutes=west)
        return f"{_date(there)}T{_clock(there)}.{frac:03d}{_offset(west, minus=chr(0x2212))}"
    if variant == "naive":
        return f"{_date(utc)}T{_clock(utc)}.{frac:03d}"
    if variant == "space":
        return f"{_date(utc)} {_clock(utc)}.{frac:03d}Z"
    if variant == "micro":
        return f"{_date(utc)}T{_clock(utc)}.{frac:03d}000Z"
    if variant == "nano":
        return f"{_date(utc)}T{_clock(utc)}.{frac:03d}000000Z"
    if variant == "comma":
        return f"{_date(utc)}T{_clock(utc)},{frac:03d}Z"
    if variant == "no_fraction":
        return None if frac else f"{_date(utc)}T{_clock(utc)}Z"
    if variant == "minutes":
        return None if frac or utc.second else f"{_date(utc)}T{utc.hour:02d}:{utc.minute:02d}Z"
    if variant == "hours":
        return None if frac or utc.second or utc.minute else f"{_date(utc)}T{utc.hour:02d}Z"
    if variant == "date_only":
        return None if ms % 86_400_000 else _date(utc)
    if variant == "basic":
        return f"{_date(utc).replace('-', '')}T{_clock(utc, '')}.{frac:03d}Z"
    if variant == "basic_no_fraction":
        return None if frac else f"{_date(utc).replace('-', '')}T{_clock(utc, '')}Z"
    if variant in ("week", "week_basic"):
        year, week, weekday = utc.isocalendar()
        if variant == "week":
            return f"{year:04d}-W{week:02d}-{weekday}T{_clock(utc)}.{frac:03d}Z"
        return f"{year:04d}W{week:02d}{weekday}T{_clock(utc, '')}.{frac:03d}Z"
    if variant == "ordinal":
        return f"{utc.year:04d}-{utc.timetuple().tm_yday:03d}T{_clock(utc)}.{frac:03d}Z"
    if variant == "ordinal_basic":
        return f"{utc.year:04d}{utc.timetuple().tm_yday:03d}T{_clock(utc, '')}.{frac:03d}Z"
    if variant == "end_of_day":  # midnight as the end of the day before
        return None if ms % 86_400_000 else f"{_date(utc - timedelta(days=1))}T24:00:00Z"
    if variant == "padded":
        return f" \t{_date(utc)}T{_clock(utc)}.{frac:03d}Z\n "
    if variant == "fraction_of_minute":
        digits = _decimal(utc.second * 1000 + frac, 60_000)
        return None if digits is None else f"{_date(utc)}T{utc.hour:02d}:{utc.minute:02d},{digits}Z"
    if variant == "fraction_of_hour":
        digits = _decimal((utc.minute * 60 + utc.second) * 1000 + frac, 3_600_000)
        return None if digits is None else f"{_date(utc)}T{utc.hour:02d}.{digits}Z"
    raise ValueError(f"unknown variant {variant!r}")
