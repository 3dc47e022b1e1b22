"""NONMEM dosing records → a sorted table of state-changing events (vectorised, no loops).

Semantics (NONMEM's, checked against the nmtests dosing suite):

* EVID 0 observation, 1 dose, 2 other (output only), 3 reset, 4 reset and dose.
* AMT × F is the amount given. RATE 0: bolus. RATE > 0: infusion at RATE, so F changes the
  duration. RATE −1: rate modeled (Rn), RATE −2: duration modeled (Dn), so F changes the rate.
* ALAGn delays every dose of the record (including ADDL copies); ADDL adds doses every II.
* SS 1 resets the system to the steady state of doses every II (bolus, infusion, also with
  infusions longer than II, and with lag time) before the dose; SS 2 adds that steady state to
  the current amounts; SS with AMT 0 and RATE > 0 sets the steady state of a constant
  infusion, which NONMEM then does not continue (nmtests ID 29: concentrations decline).
* Order: records are processed in file order; within a record reset → steady state → dose →
  output. Events implied by earlier records (ADDL doses, lagged doses, infusion ends) at the
  same time as a record are processed before it. After a reset (EVID 3/4) pending implied
  events of earlier records are dropped and TIME may restart; an SS 1 record or a reset ends
  running infusions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Doses", "EventTable", "build_events", "RESET", "STEADY", "BOLUS", "RATE"]

RESET, STEADY, BOLUS, RATE = 0, 1, 2, 3
SS_BOLUS, SS_INFUSION, SS_CONSTANT = 0, 1, 2
_EPS = 1e-9


@dataclass(frozen=True)
class Doses:
    """Per-record arrays (length = number of records), in processing order.

    ``cmt`` is the 0-based state index (already resolved from CMT and the default);
    ``f``, ``lag``, ``rate_model``, ``dur_model`` are the model's Fn, ALAGn, Rn, Dn
    evaluated for each record's compartment (1, 0, nan, nan when the model has none).
    """

    subject: np.ndarray
    time: np.ndarray
    evid: np.ndarray
    amt: np.ndarray
    cmt: np.ndarray
    rate: np.ndarray
    ii: np.ndarray
    addl: np.ndarray
    ss: np.ndarray
    f: np.ndarray
    lag: np.ndarray
    rate_model: np.ndarray
    dur_model: np.ndarray


@dataclass(frozen=True)
class EventTable:
    """State-changing events sorted by (subject, processing order); one START per subject.

    ``slot`` is the record index the event belongs to (implied events: the first record they
    precede); an output of record r sees every event with slot ≤ r.
    """

    subject: np.ndarray
    time: np.ndarray
    kind: np.ndarray
    cmt: np.ndarray
    value: np.ndarray  # bolus amount or rate change
    slot: np.ndarray
    ss_row: np.ndarray  # row of the steady-state fields below for STEADY events, else -1
    # steady-state fields, one row per STEADY event (compact)
    ss_type: np.ndarray
    ss_mode: np.ndarray
    ss_amt: np.ndarray
    ss_rate: np.ndarray
    ss_dur: np.ndarray
    ss_ii: np.ndarray
    ss_lag: np.ndarray
    ss_k0: np.ndarray
    ss_k1: np.ndarray

    def __len__(self) -> int:
        return len(self.time)


class DoseError(ValueError):
    """A dose whose model-computed rate, duration or lag is invalid (names the record)."""

    def __init__(self, record: int, message: str):
        super().__init__(message)
        self.record = record


def build_events(d: Doses) -> EventTable:
    """Expand dose records (ADDL, lag, infusions, SS) into a sorted event table."""
    n = len(d.time)
    rec = np.arange(n)
    evid = d.evid.astype(int)
    is_dose = (evid == 1) | (evid == 4)
    is_reset = (evid == 3) | (evid == 4)
    ss = np.where(is_dose, d.ss, 0).astype(int)
    const = is_dose & (ss > 0) & (d.amt == 0) & (d.rate > 0)
    amt = d.amt * d.f

    # infusion rate and duration of every dose record --------------------------------------
    rate = np.zeros(n)
    dur = np.zeros(n)
    inf = is_dose & (d.rate != 0) & ~const
    with np.errstate(divide="ignore", invalid="ignore"):
        given = inf & (d.rate > 0)
        rate[given], dur[given] = d.rate[given], amt[given] / d.rate[given]
        m1 = inf & (d.rate == -1)
        rate[m1], dur[m1] = d.rate_model[m1], amt[m1] / d.rate_model[m1]
        m2 = inf & (d.rate == -2)
        dur[m2], rate[m2] = d.dur_model[m2], amt[m2] / d.dur_model[m2]
    bad = inf & ~((rate > 0) & np.isfinite(rate) & (dur >= 0) & np.isfinite(dur))
    if bad.any():
        r = int(rec[bad][0])
        what = "Rn (RATE=-1)" if d.rate[r] == -1 else "Dn (RATE=-2)" if d.rate[r] == -2 else "RATE"
        raise DoseError(r, f"infusion needs a positive {what}; got rate {rate[r]:g}, "
                        f"duration {dur[r]:g}")
    lag = np.where(is_dose, d.lag, 0.0)
    if np.any(lag < 0) or not np.all(np.isfinite(lag)):
        r = int(rec[(lag < 0) | ~np.isfinite(lag)][0])
        raise DoseError(r, f"lag time must be >= 0, got {lag[r]:g}")
    zero_inf = inf & (dur <= 0)  # an infusion of zero amount (F = 0): nothing to give
    inf &= ~zero_inf

    # epochs: count of EVID 3/4 (time epoch) and of all resets incl. SS=1 (rate epoch) -------
    first = np.r_[True, d.subject[1:] != d.subject[:-1]]
    tepoch = _cumcount_by_subject(is_reset, first)
    repoch = _cumcount_by_subject(is_reset | (ss == 1), first)

    parts: list[dict[str, np.ndarray]] = []

    def add(rec_idx, time, kind, cmt, value, implied, sub, pair=None, **ss_fields):
        k = len(rec_idx)
        if k == 0:
            return
        pair = np.full(k, -1) if pair is None else pair
        parts.append(dict(rec=rec_idx, time=time, kind=np.full(k, kind), cmt=cmt,
                          value=value, implied=implied, sub=np.full(k, sub), pair=pair,
                          **ss_fields))

    # subject start: initial conditions at the first record's time --------------------------
    starts = rec[first]
    add(starts, d.time[starts], RESET, np.zeros(len(starts), int), np.zeros(len(starts)),
        np.zeros(len(starts), bool), -1)
    # resets (EVID 3/4)
    r_idx = rec[is_reset]
    add(r_idx, d.time[r_idx], RESET, np.zeros(len(r_idx), int), np.zeros(len(r_idx)),
        np.zeros(len(r_idx), bool), 0)

    # steady state --------------------------------------------------------------------------
    s_idx = rec[is_dose & (ss > 0)]
    if len(s_idx):
        ii = d.ii[s_idx]
        lg = lag[s_idx]
        typ = np.where(const[s_idx], SS_CONSTANT, np.where(inf[s_idx], SS_INFUSION, SS_BOLUS))
        du = np.where(typ == SS_INFUSION, dur[s_idx], 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            k0 = np.where(ii > 0, np.floor(lg / ii + _EPS) + 1, 1).astype(int)
            k1 = np.where(ii > 0, np.maximum(k0, np.ceil((du + lg) / ii - _EPS)), k0).astype(int)
        k1 = np.where(typ == SS_INFUSION, k1, k0)
        ss_pair = np.arange(len(s_idx))
        add(s_idx, d.time[s_idx], STEADY, d.cmt[s_idx], np.zeros(len(s_idx)),
            np.zeros(len(s_idx), bool), 1, pair=ss_pair, ss_type=typ, ss_mode=ss[s_idx],
            ss_amt=amt[s_idx],
            ss_rate=np.where(const[s_idx], d.rate[s_idx], rate[s_idx]), ss_dur=du, ss_ii=ii,
            ss_lag=lg, ss_k0=k0, ss_k1=k1)
        # infusions still running at the SS record end at t0 + D − (k·II − L), k0 ≤ k < k1
        n_on = k1 - k0
        if n_on.sum():
            src = np.repeat(np.arange(len(s_idx)), n_on)
            k = k0[src] + _ranks(n_on)
            r = s_idx[src]
            t_off = d.time[r] + du[src] - (k * ii[src] - lg[src])
            add(r, t_off, RATE, d.cmt[r], -rate[r], np.ones(len(r), bool), 2, pair=ss_pair[src])

    # doses (with ADDL copies and lag) --------------------------------------------------------
    g_idx = rec[is_dose & ~const & ~zero_inf]
    copies = np.where(d.ii[g_idx] > 0, d.addl[g_idx], 0).astype(int) + 1
    r = np.repeat(g_idx, copies)
    k = _ranks(copies)
    t_dose = d.time[r] + k * d.ii[r] + lag[r]
    own = (k == 0) & (lag[r] == 0)
    bol = ~inf[r]
    add(r[bol], t_dose[bol], BOLUS, d.cmt[r[bol]], amt[r[bol]], ~own[bol], 2)
    ri = r[~bol]
    inf_pair = len(d.time) + np.arange(len(ri))  # distinct from the SS pair ids
    add(ri, t_dose[~bol], RATE, d.cmt[ri], rate[ri], ~own[~bol], 2, pair=inf_pair)
    add(ri, t_dose[~bol] + dur[ri], RATE, d.cmt[ri], -rate[ri], np.ones(len(ri), bool), 2,
        pair=inf_pair)
    return _assemble(parts, d, tepoch, repoch)


def _assemble(parts, d: Doses, tepoch, repoch) -> EventTable:
    keys = ("rec", "time", "kind", "cmt", "value", "implied", "sub", "pair")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    ss_cols = ("ss_type", "ss_mode", "ss_amt", "ss_rate", "ss_dur", "ss_ii", "ss_lag",
               "ss_k0", "ss_k1")
    ss_parts = [p for p in parts if "ss_type" in p]
    ss = {c: np.concatenate([p[c] for p in ss_parts]) if ss_parts else np.zeros(0)
          for c in ss_cols}
    ss_id = []
    offset = 0
    for p in parts:
        k = len(p["rec"])
        ss_id.append(np.arange(offset, offset + k) if "ss_type" in p else np.full(k, -1))
        offset += k if "ss_type" in p else 0
    cat["ss_row"] = np.concatenate(ss_id)
    n_rec = len(d.time)
    src, imp = cat["rec"], cat["implied"]
    subj = d.subject[src]
    # slot of implied events: the first record of the same subject and time epoch at or after
    # the event time (implied events go before records at equal time). Events past the last
    # record of their epoch are dropped: a reset wipes them, or no output ever sees them.
    slot = src.copy()
    keep = np.ones(len(src), bool)
    if imp.any():
        ni = int(imp.sum())
        # (subject, time epoch) group of each record; records first at equal times
        group = np.cumsum(np.r_[True, (d.subject[1:] != d.subject[:-1])
                                | (tepoch[1:] != tepoch[:-1])])
        tie = np.concatenate([np.arange(1, n_rec + 1), np.zeros(ni, np.int64)])
        order = np.lexsort((tie, np.concatenate([d.time, cat["time"][imp]]),
                            np.concatenate([group, group[src[imp]]])))
        is_rec = order < n_rec
        before = np.cumsum(is_rec) - is_rec
        pos = np.empty(len(order), int)
        pos[order] = np.arange(len(order))
        s_imp = before[pos[n_rec:]]
        ok = s_imp < n_rec
        s_safe = np.minimum(s_imp, n_rec - 1)
        ok &= (d.subject[s_safe] == subj[imp]) & (tepoch[s_safe] == tepoch[src[imp]])
        slot[imp] = s_safe
        keep[imp] = ok
    # rate epoch in force when each event is processed: implied events come before their slot
    # record's own reset (EVID 3/4 or SS=1), the record's own events after it.
    resets_here = repoch - np.r_[0, repoch[:-1]]
    first = np.r_[True, d.subject[1:] != d.subject[:-1]]
    resets_here = np.where(first, repoch, resets_here)
    epoch = repoch[slot] - np.where(imp, resets_here[slot], 0)
    # an infusion end whose start was in an earlier rate epoch is void (the reset stopped it)
    pair = cat["pair"]
    has_pair = pair >= 0
    if has_pair.any():
        start_epoch = np.full(int(pair.max()) + 1, -1)
        starts = has_pair & ~((cat["kind"] == RATE) & (cat["value"] < 0))
        start_epoch[pair[starts]] = np.where(keep[starts], epoch[starts], -2)
        ends = has_pair & ~starts
        keep[ends] &= start_epoch[pair[ends]] == epoch[ends]
    idx = np.flatnonzero(keep)
    # slot (a record index) implies the subject; implied events first, then by time
    order = np.lexsort((cat["sub"][idx], cat["time"][idx], 2 * slot[idx] + ~imp[idx]))
    idx = idx[order]
    out = {k: cat[k][idx] for k in ("time", "kind", "cmt", "value", "ss_row")}
    return EventTable(subject=subj[idx], slot=slot[idx], **out, **ss)


def _cumcount_by_subject(flag: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Running count of ``flag`` within each subject (first record of a subject starts at 0)."""
    c = np.cumsum(flag)
    base = np.maximum.accumulate(np.where(first, c - flag, 0))
    return c - base


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, …, c−1 for each count c, concatenated."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, int)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - starts
