"""Dosing regimens as clinicians write them, converted to and from NONMEM dose records.

Times are hours with day 1 = 0 h (day ``d`` starts at ``(d - 1) * 24`` h); amounts are mg.

Grammar (case-insensitive, whitespace tolerant)::

    regimen  := "none" | phase ( ", then " phase )*
    phase    := <dose> "mg" <freq> [ "for" <N> <unit> ]  |  "none" [ "for" <N> <unit> ]
    freq     := QD | BID | QW | BIW | TIW | Q2W | Q3W | Q4W | Q<n>H | Q<n>D | Q<n>W
    unit     := week[s] | day[s] | dose[s] | cycle[s]

QD = every 24 h, BID = every 12 h, QW = day 1 of each week, BIW = days 1 and 3 of each
week (0 h and 48 h), TIW = days 1, 3 and 5 (0, 48, 96 h). A cycle is one repeat of the
frequency (1 week for QW/BIW/TIW, 3 weeks for Q3W, 24 h for QD). ``for N doses`` ends the
phase when the (N+1)-th dose would have been due. Each phase starts when the previous one
ends; a phase without ``for`` is open-ended and must be the last one.

Internally a regimen is an explicit, sorted tuple of ``(time_h, amount_mg)`` events plus an
optional open-ended tail of streams ``(first_time_h, interval_h, amount_mg)``, each repeating
forever.

Example::

    >>> r = Regimen.parse("80 mg BIW for 4 weeks")
    >>> r.doses()[0]
    array([  0.,  48., 168., 216., 336., 384., 504., 552.])
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Regimen", "RegimenError"]

HOURS_PER_DAY = 24.0
HOURS_PER_WEEK = 168.0

_FREQ_HELP = "expected QD, BID, QW, BIW, TIW, Q2W, Q3W, Q4W, Q<n>H, Q<n>D"
_PHASE_HELP = "expected '<dose> mg <freq>', e.g. '80 mg QW'"
_FOR_HELP = "expected 'for <N> weeks|days|doses|cycles'"
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THEN = re.compile(r"\s*,?\s*\bthen\b\s*", re.IGNORECASE)
_MG = re.compile(r"(?P<dose>.*?)\s*(?<![a-z])mg\b\s*(?P<rest>.*)", re.IGNORECASE | re.DOTALL)
_QN = re.compile(r"Q(?P<n>\d+)(?P<unit>[HDW])", re.IGNORECASE)
_UNITS = {
    "week": "weeks", "weeks": "weeks", "day": "days", "days": "days",
    "dose": "doses", "doses": "doses", "cycle": "cycles", "cycles": "cycles",
}  # fmt: skip
_NAMED_FREQ: dict[str, tuple[float, tuple[float, ...]]] = {
    "QD": (24.0, (0.0,)),
    "BID": (12.0, (0.0,)),
    "QW": (168.0, (0.0,)),
    "BIW": (168.0, (0.0, 48.0)),
    "TIW": (168.0, (0.0, 48.0, 96.0)),
}

Event = tuple[float, float]  # (time h, amount mg)
Stream = tuple[float, float, float]  # (first time h, interval h, amount mg)


class RegimenError(ValueError):
    """A regimen text, record table or request that cannot be honoured (one-line message)."""


def _fmt(x: float) -> str:
    """Format a number compactly: 4.0 -> '4', 2.5 -> '2.5'."""
    x = float(x)
    return str(int(x)) if x.is_integer() else f"{x:g}"


def _day_to_hours(day: float) -> float:
    """Clinical day number (1-based) to time in h."""
    return (float(day) - 1.0) * HOURS_PER_DAY


@dataclass(frozen=True)
class _Phase:
    amount: float | None  # mg per dose; None for a dose-free ("none") phase
    period: float  # h between repeats of the pattern
    offsets: tuple[float, ...]  # dose times within one period, h
    duration: float | None  # h; None = open-ended
    n_doses: int | None  # set for "for N doses"


class _Parser:
    """Parses one regimen text; every error quotes the whole text."""

    def __init__(self, text: str) -> None:
        self.text = text
        shown = " ".join(text.split()) if any(c in text for c in "\r\n\t") else text
        self.prefix = f"cannot parse regimen '{shown}'"

    def fail(self, why: str) -> RegimenError:
        return RegimenError(f"{self.prefix}: {why}")

    def parse(self) -> list[_Phase]:
        body = self.text.strip()
        if not body:
            raise self.fail("empty text (expected '<dose> mg <freq>' or 'none')")
        parts = _THEN.split(body)
        phases: list[_Phase] = []
        for i, part in enumerate(parts):
            part = part.strip()
            if not part:
                if i == 0:
                    raise self.fail(f"nothing before 'then' ({_PHASE_HELP})")
                raise self.fail(
                    f"nothing after 'then' (expected phase {i + 1} as '<dose> mg <freq>', "
                    f"e.g. '80 mg QW')"
                )
            phases.append(self.phase(part))
        for i, ph in enumerate(phases[:-1]):
            if ph.duration is None:
                raise self.fail(
                    f"phase {i + 1} '{parts[i].strip()}' has no duration, so phase {i + 2} "
                    f"never starts (add 'for <N> weeks')"
                )
        return phases

    def phase(self, part: str) -> _Phase:
        head, *tail = part.split(None, 1)
        if head.lower() == "none":
            duration = None
            if tail:
                duration, _ = self.duration(tail[0], period=None, offsets=())
            return _Phase(None, HOURS_PER_WEEK, (), duration, None)
        m = _MG.fullmatch(part)
        if m is None:
            raise self.fail(f"missing 'mg' in '{part}' ({_PHASE_HELP})")
        dose_text, rest = m["dose"].strip(), m["rest"].strip()
        if not dose_text:
            raise self.fail(f"missing dose before 'mg' ({_PHASE_HELP})")
        if not _NUMBER.fullmatch(dose_text) or not (
            math.isfinite(float(dose_text)) and float(dose_text) > 0
        ):
            raise self.fail(f"dose must be a positive number of mg, got '{dose_text}'")
        if not rest:
            raise self.fail(f"missing frequency after 'mg' ({_FREQ_HELP})")
        freq, *after_ = rest.split(None, 1)
        period, offsets = self.frequency(freq)
        after = after_[0].strip() if after_ else ""
        duration: float | None = None
        n_doses: int | None = None
        if after:
            duration, n_doses = self.duration(after, period=period, offsets=offsets)
        return _Phase(float(dose_text), period, offsets, duration, n_doses)

    def frequency(self, token: str) -> tuple[float, tuple[float, ...]]:
        key = token.upper()
        if key in _NAMED_FREQ:
            return _NAMED_FREQ[key]
        m = _QN.fullmatch(key)
        if m is None:
            raise self.fail(f"unknown frequency '{token}' ({_FREQ_HELP})")
        n = int(m["n"])
        if n <= 0:
            raise self.fail(f"frequency interval must be positive, got '{token}'")
        unit = {"H": 1.0, "D": HOURS_PER_DAY, "W": HOURS_PER_WEEK}[m["unit"]]
        return n * unit, (0.0,)

    def duration(
        self, clause: str, *, period: float | None, offsets: tuple[float, ...]
    ) -> tuple[float, int | None]:
        """Duration in h (and dose count for 'doses') of a 'for N unit' clause."""
        words = clause.split()
        shown = " ".join(words)
        if words[0].lower() != "for":
            raise self.fail(f"unexpected '{shown}' after the frequency ({_FOR_HELP})")
        if len(words) == 1:
            raise self.fail(f"missing duration after 'for' ({_FOR_HELP})")
        count_text = words[1]
        if count_text.lower() in _UNITS:
            raise self.fail(f"missing count in '{shown}' ({_FOR_HELP})")
        if not _NUMBER.fullmatch(count_text) or not math.isfinite(float(count_text)):
            raise self.fail(f"duration count must be a number, got '{count_text}' in '{shown}'")
        count = float(count_text)
        if count <= 0:
            raise self.fail(f"duration must be positive, got '{shown}'")
        if len(words) == 2:
            raise self.fail(f"missing unit in '{shown}' ({_FOR_HELP})")
        unit = _UNITS.get(words[2].lower())
        if unit is None:
            raise self.fail(
                f"unknown duration unit '{words[2]}' (expected weeks, days, doses or cycles)"
            )
        if len(words) > 3:
            raise self.fail(f"unexpected '{' '.join(words[3:])}' after '{' '.join(words[:3])}'")
        if unit == "weeks":
            return count * HOURS_PER_WEEK, None
        if unit == "days":
            return count * HOURS_PER_DAY, None
        if period is None:
            raise self.fail(f"'none' lasts weeks or days, not {unit} (got '{shown}')")
        if not count.is_integer():
            raise self.fail(f"number of {unit} must be a whole number, got '{count_text}'")
        n = int(count)
        if unit == "cycles":
            return n * period, None
        k, j = divmod(n, len(offsets))  # the (n+1)-th dose would be due here
        return k * period + offsets[j], n


def _phase_events(ph: _Phase, start: float) -> tuple[list[Event], list[Stream]]:
    """Dose events of a finite phase, or the tail streams of an open-ended one."""
    if ph.amount is None:
        return [], []
    if ph.duration is None:
        return [], [(start + o, ph.period, ph.amount) for o in ph.offsets]
    events: list[Event] = []
    n_cycles = int(math.ceil(ph.duration / ph.period)) + 1
    for k in range(n_cycles):
        for o in ph.offsets:
            t = k * ph.period + o
            if t < ph.duration and (ph.n_doses is None or len(events) < ph.n_doses):
                events.append((start + t, ph.amount))
    return events, []


def _stream_times(stream: Stream, until: float) -> np.ndarray:
    """Times (h) of a stream's doses at t < until."""
    start, interval, _ = stream
    if until <= start:
        return np.empty(0)
    n = int(math.ceil((until - start) / interval)) + 1
    times = start + interval * np.arange(n, dtype=float)
    return times[times < until]


def _first_at_or_after(stream: Stream, t: float) -> float:
    """Time (h) of the stream's first dose at or after t."""
    start, interval, _ = stream
    if t <= start:
        return start
    k = max(0, int(math.ceil((t - start) / interval)) - 1)
    while start + k * interval < t:
        k += 1
    return start + k * interval


def _sorted_events(events: list[Event]) -> tuple[Event, ...]:
    return tuple(sorted((float(t), float(a)) for t, a in events))


@dataclass(frozen=True)
class Regimen:
    """An immutable dosing regimen (times h, day 1 = 0 h; amounts mg).

    ``events`` are explicit ``(time_h, amount_mg)`` doses; ``tail`` holds open-ended streams
    ``(first_time_h, interval_h, amount_mg)``. Build one with :meth:`parse` or
    :meth:`from_records` rather than by hand.
    """

    events: tuple[Event, ...] = ()
    tail: tuple[Stream, ...] = ()
    description: str = "none"
    first_phase_weekly: float = 0.0

    def __post_init__(self) -> None:
        for t, a in self.events:
            if not (math.isfinite(t) and math.isfinite(a) and a > 0):
                raise RegimenError(f"invalid dose event ({t} h, {a} mg): need finite t, amount > 0")
        for s, ii, a in self.tail:
            if not (math.isfinite(s) and math.isfinite(ii) and ii > 0 and a > 0):
                raise RegimenError(f"invalid stream ({s} h every {ii} h, {a} mg)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, text: str) -> Regimen:
        """Parse a regimen such as ``"100 mg QW for 4 weeks, then 80 mg QW"``."""
        if not isinstance(text, str):
            raise RegimenError(f"cannot parse regimen {text!r}: expected a string")
        parser = _Parser(text)
        if text.strip().lower() == "none":
            return cls(description="none")
        phases = parser.parse()
        events: list[Event] = []
        tail: list[Stream] = []
        start = 0.0
        for ph in phases:
            ev, st = _phase_events(ph, start)
            events.extend(ev)
            tail.extend(st)
            start += ph.duration or 0.0
        dosing = [ph for ph in phases if ph.amount is not None]
        weekly = 0.0
        if dosing:
            first = dosing[0]
            amount = first.amount or 0.0
            weekly = amount * len(first.offsets) * HOURS_PER_WEEK / first.period
        return cls(_sorted_events(events), tuple(tail), " ".join(text.split()), weekly)

    @classmethod
    def from_records(cls, df: pd.DataFrame) -> Regimen:
        """Build a regimen from NONMEM rows (TIME h, AMT mg, optional EVID, II h, ADDL, ID).

        Dose rows are EVID 1 or 4 (or AMT > 0 when there is no EVID column); ADDL is
        expanded to explicit doses at TIME + k * II. Exactly one ID is allowed.
        """
        cols = {str(c).upper(): c for c in df.columns}
        missing = [c for c in ("TIME", "AMT") if c not in cols]
        if missing:
            raise RegimenError(f"from_records needs columns TIME and AMT; missing {missing}")
        if "ID" in cols:
            ids = pd.unique(df[cols["ID"]].dropna())
            if len(ids) > 1:
                shown = ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
                raise RegimenError(
                    f"from_records expects one ID, got {len(ids)} ({shown}); "
                    f"select one with df[df.ID == k]"
                )

        def col(name: str, default: float) -> np.ndarray:
            if name not in cols:
                return np.full(len(df), default, dtype=float)
            return pd.to_numeric(df[cols[name]], errors="coerce").to_numpy(dtype=float)

        time, amt, ii, addl = col("TIME", np.nan), col("AMT", 0.0), col("II", 0.0), col("ADDL", 0)
        if "EVID" in cols:
            is_dose = np.isin(col("EVID", 0), (1, 4))
        else:
            is_dose = np.nan_to_num(amt) > 0
        for name in ("SS", "RATE"):
            if name in cols and np.any(np.nan_to_num(col(name, 0.0)[is_dose]) != 0):
                raise RegimenError(f"from_records: nonzero {name} is not supported")
        time, amt = time[is_dose], amt[is_dose]
        ii, addl = np.nan_to_num(ii[is_dose]), np.nan_to_num(addl[is_dose])
        bad = ~(np.isfinite(time) & np.isfinite(amt) & (amt > 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise RegimenError(
                f"from_records: dose row with TIME={time[i]}, AMT={amt[i]} "
                f"(expected finite TIME and AMT > 0)"
            )
        if np.any((addl < 0) | (addl != np.round(addl)) | ((addl > 0) & (ii <= 0))):
            raise RegimenError("from_records: ADDL must be a whole number >= 0, with II > 0")
        events: list[Event] = []
        for t, a, step, extra in zip(time, amt, ii, addl, strict=True):
            times = t + step * np.arange(int(extra) + 1, dtype=float)
            events.extend((float(x), float(a)) for x in times)
        weekly = 0.0
        if len(time):
            order = np.lexsort((amt, time))
            t0, a0, ii0 = time[order[0]], amt[order[0]], ii[order[0]]
            if ii0 > 0 and addl[order[0]] > 0:
                group = (ii == ii0) & (amt == a0) & (addl > 0) & (time >= t0) & (time < t0 + ii0)
                weekly = float(a0 * group.sum() * HOURS_PER_WEEK / ii0)
            else:
                weekly = float(sum(a for t, a in events if t0 <= t < t0 + HOURS_PER_WEEK))
        label = f"from records: {len(events)} doses" if events else "none"
        return cls(_sorted_events(events), (), label, weekly)

    # ------------------------------------------------------------------ queries
    @property
    def label(self) -> str:
        """Parsed text, or a description after hold/reduce ('100 mg QW, held days 15-21')."""
        return self.description

    @property
    def open_ended(self) -> bool:
        """True if the regimen repeats forever (needs ``until`` for doses/records)."""
        return bool(self.tail)

    @property
    def weekly_dose(self) -> float:
        """Nominal mg per week of the first dosing phase as prescribed (0 for 'none').

        Not changed by hold/reduce; for records it is inferred from the earliest row.
        """
        return self.first_phase_weekly

    def doses(self, until: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dose times (h, sorted) and amounts (mg) of doses at t < until.

        ``until`` (h) may be omitted only for a regimen with a final duration.
        """
        if until is None:
            if self.tail:
                raise RegimenError(
                    f"regimen '{self.label}' is open-ended; pass until=<time in h> to get its doses"
                )
            times = np.array([t for t, _ in self.events], dtype=float)
            amounts = np.array([a for _, a in self.events], dtype=float)
        else:
            until = float(until)
            kept = [(t, a) for t, a in self.events if t < until]
            parts_t = [np.array([t for t, _ in kept], dtype=float)]
            parts_a = [np.array([a for _, a in kept], dtype=float)]
            for stream in self.tail:
                st = _stream_times(stream, until)
                parts_t.append(st)
                parts_a.append(np.full(len(st), stream[2], dtype=float))
            times, amounts = np.concatenate(parts_t), np.concatenate(parts_a)
        order = np.lexsort((amounts, times))
        return times[order], amounts[order]

    def total_dose(self, until: float | None = None) -> float:
        """Total mg given at t < until (h); ``until`` is required if open-ended."""
        return float(self.doses(until)[1].sum())

    # ------------------------------------------------------------------ modifications
    def hold(self, start_day: float, end_day: float) -> Regimen:
        """Skip every dose in days [start_day, end_day) (1-based: hold(15, 22) skips days 15-21)."""
        if not (math.isfinite(start_day) and math.isfinite(end_day) and end_day > start_day):
            raise RegimenError(
                f"hold needs start_day < end_day (1-based days), got {start_day}, {end_day}"
            )
        a, b = _day_to_hours(start_day), _day_to_hours(end_day)
        events = [(t, amt) for t, amt in self.events if not a <= t < b]
        tail: list[Stream] = []
        for stream in self.tail:
            events.extend((float(t), stream[2]) for t in _stream_times(stream, a))
            tail.append((_first_at_or_after(stream, b), stream[1], stream[2]))
        first, last = float(start_day), float(end_day) - 1
        if first.is_integer() and last.is_integer():
            days = f"day {_fmt(first)}" if last == first else f"days {_fmt(first)}-{_fmt(last)}"
        else:
            days = f"from day {_fmt(start_day)} to before day {_fmt(end_day)}"
        return Regimen(
            _sorted_events(events),
            tuple(tail),
            f"{self.label}, held {days}",
            self.first_phase_weekly,
        )

    def reduce(self, from_day: float, dose: float) -> Regimen:
        """Give ``dose`` mg instead at every dose on or after day ``from_day`` (1-based)."""
        if not (math.isfinite(from_day) and math.isfinite(dose) and dose > 0):
            raise RegimenError(
                f"reduce needs a finite day and a positive dose in mg, got {from_day}, {dose}"
            )
        c = _day_to_hours(from_day)
        dose = float(dose)
        events = [(t, dose if t >= c else amt) for t, amt in self.events]
        tail: list[Stream] = []
        for stream in self.tail:
            events.extend((float(t), stream[2]) for t in _stream_times(stream, c))
            tail.append((_first_at_or_after(stream, c), stream[1], dose))
        return Regimen(
            _sorted_events(events),
            tuple(tail),
            f"{self.label}, reduced to {_fmt(dose)} mg from day {_fmt(from_day)}",
            self.first_phase_weekly,
        )

    # ------------------------------------------------------------------ NONMEM records
    def to_records(self, *, id: int = 1, cmt: int = 1, until: float | None = None) -> pd.DataFrame:
        """NONMEM dose rows (ID, TIME h, EVID=1, AMT mg, CMT, II h, ADDL) for doses at t < until.

        Each run of equally spaced equal doses becomes one row with II and ADDL; a BIW
        regimen gives one row per weekday, each with II=168.
        """
        times, amounts = self.doses(until)
        rows = _compress(times, amounts)
        out = pd.DataFrame(
            {
                "ID": np.full(len(rows), id, dtype=int),
                "TIME": np.array([r[0] for r in rows], dtype=float),
                "EVID": np.ones(len(rows), dtype=int),
                "AMT": np.array([r[1] for r in rows], dtype=float),
                "CMT": np.full(len(rows), cmt, dtype=int),
                "II": np.array([r[2] for r in rows], dtype=float),
                "ADDL": np.array([r[3] for r in rows], dtype=int),
            }
        )
        return out.sort_values(["TIME", "AMT"], kind="stable").reset_index(drop=True)

    def __str__(self) -> str:
        return self.label


def _compress(
    times: np.ndarray, amounts: np.ndarray, max_candidates: int = 12
) -> list[tuple[float, float, float, int]]:
    """Cover doses with arithmetic runs of equal amounts -> rows (TIME h, AMT mg, II h, ADDL).

    Candidate intervals are the gaps from each dose to the next few doses of the same amount;
    for each interval the doses are split into maximal runs, and runs are taken longest first
    (set-cover greedy; runs broken by an accepted run are split and re-queued). A run only
    holds times equal to ``TIME + k * II`` exactly, so expanding ADDL reproduces the doses.
    """
    n = len(times)
    slots: dict[tuple[float, float], list[int]] = {}
    groups: dict[float, list[int]] = {}
    for i in range(n):
        t, a = float(times[i]), float(amounts[i])
        slots.setdefault((t, a), []).append(i)
        groups.setdefault(a, []).append(i)

    heap: list[tuple[int, float, float, int, list[int]]] = []
    for i in range(n):
        heapq.heappush(heap, (-1, float(times[i]), 0.0, len(heap), [i]))
    for a, idx in groups.items():
        distinct = sorted({float(times[i]) for i in idx})
        steps = {
            t2 - t1
            for j, t1 in enumerate(distinct)
            for t2 in distinct[j + 1 : j + 1 + max_candidates]
        }
        for step in sorted(steps):
            in_run: set[int] = set()
            for i in idx:
                if i in in_run:
                    continue
                members = [i]
                in_run.add(i)
                t0 = float(times[i])
                while True:
                    nxt = [
                        m for m in slots.get((t0 + len(members) * step, a), ()) if m not in in_run
                    ]
                    if not nxt:
                        break
                    members.append(nxt[0])
                    in_run.add(nxt[0])
                if len(members) > 1:
                    heapq.heappush(heap, (-len(members), t0, step, len(heap), members))

    used = np.zeros(n, dtype=bool)
    rows: list[tuple[float, float, float, int]] = []
    counter = len(heap)
    while heap:
        _, t0, step, _, members = heapq.heappop(heap)
        segments: list[list[int]] = []
        current: list[int] = []
        for m in members:
            if used[m] or (
                current and float(times[m]) != float(times[current[0]]) + len(current) * step
            ):
                if current:
                    segments.append(current)
                current = [] if used[m] else [m]
            else:
                current.append(m)
        if current:
            segments.append(current)
        if len(segments) == 1 and len(segments[0]) == len(members):
            used[members] = True
            rows.append((t0, float(amounts[members[0]]), step, len(members) - 1))
            continue
        for seg in segments:
            counter += 1
            seg_step = step if len(seg) > 1 else 0.0
            heapq.heappush(heap, (-len(seg), float(times[seg[0]]), seg_step, counter, seg))
    return rows
