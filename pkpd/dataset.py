"""NONMEM-format CSV datasets: reading, validation, writing, and checks against a model.

Reading follows NONMEM habits:

* the first non-comment line is the header; column names are case-insensitive and are
  normalised to upper case (two names equal ignoring case are an error);
* a line whose first field starts with ``#`` or ``@`` is a comment (``IGNORE=#`` / ``IGNORE=@``);
  if the first column is named ``C``, records whose ``C`` value is ``C`` (any case) are comments
  (``IGNORE=C``; other ``C`` values are not checked) and the ``C`` column is dropped; blank
  lines (all fields empty) are skipped;
* ``.`` and empty fields are missing values; every other value must be a number (covariates too);
* defaults: ``AMT``, ``RATE``, ``II``, ``ADDL``, ``SS`` and ``CMT`` are 0 when absent or missing
  (``CMT`` 0 means "the model's default compartment"); a missing ``EVID`` is derived as NONMEM
  does (1 if ``AMT`` > 0, else 2 if ``MDV`` is 1, else 0); a missing ``MDV`` is 0 for EVID 0 and
  1 otherwise; ``DV`` stays NaN when missing; covariates keep NaN for missing values (see
  :func:`check_against_model` for how they are filled).

Every problem raises :class:`DatasetError` with a one-line message naming the file, the row (the
physical 1-based line number, header and comment lines included), the column, and what was
expected versus what was found.  The first problem in file order is reported.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import numbers
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pkpd._io import atomic_path

__all__ = [
    "STANDARD",
    "Dataset",
    "DatasetError",
    "check_against_model",
    "from_frame",
    "read_nonmem",
    "write_nonmem",
]

STANDARD: tuple[str, ...] = (
    "ID", "TIME", "EVID", "AMT", "CMT", "RATE", "II", "ADDL", "SS", "MDV", "DV",
)  # fmt: skip
REQUIRED: tuple[str, ...] = ("ID", "TIME")
_DEFAULT_ZERO = ("AMT", "CMT", "RATE", "II", "ADDL", "SS")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eEdD][+-]?\d+)?")


class DatasetError(ValueError):
    """A dataset problem; ``str(err)`` is the full one-line message."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A validated NONMEM dataset.

    ``data`` has one row per record in file order, upper-case column names, every column of
    :data:`STANDARD` (float64, defaults filled in, ``DV`` NaN when missing) followed by the
    other (covariate) columns as float64 with NaN for missing values.  ``rows[i]`` is the
    1-based file row of record ``i``; ``source`` is the file name used in messages.
    """

    data: pd.DataFrame
    source: str
    rows: np.ndarray

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.data):
            raise ValueError(f"rows has {len(self.rows)} entries for {len(self.data)} records")

    def __len__(self) -> int:
        return len(self.data)

    def where(self, i: int, column: str | None = None) -> str:
        """Location of record ``i`` for messages, e.g. ``"data.csv, row 12, column TIME"``."""
        return _where(self.source, self.rows, i, column)

    @property
    def ids(self) -> np.ndarray:
        """Subject IDs, unique, in order of first appearance."""
        return pd.unique(self.data["ID"].to_numpy())

    @property
    def n_subjects(self) -> int:
        """Number of distinct subject IDs."""
        return len(self.ids)

    @property
    def covariates(self) -> list[str]:
        """Names of the non-standard columns, in order."""
        return [c for c in self.data.columns if c not in STANDARD]

    def time_after_dose(self) -> np.ndarray:
        """TAD (time units of TIME) at every record: TIME minus the nominal time of the
        subject's latest dose (EVID 1/4, ADDL copies every II included, lag time not added).
        A dose record at the same TIME counts for the records after it in the file (and for
        itself: TAD 0), an ADDL copy at that time for every later record (NONMEM processes
        it first); doses before a reset (EVID 3/4) do not count. NaN before the first dose."""
        df = self.data
        t = df["TIME"].to_numpy(dtype=float)
        evid = df["EVID"].to_numpy(dtype=int)
        ii = df["II"].to_numpy(dtype=float)
        addl = df["ADDL"].to_numpy(dtype=float).astype(int)
        ids = df["ID"].to_numpy()
        out = np.full(len(df), np.nan)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(df)], strict=True):
            r = np.arange(a, b)
            epoch = np.cumsum(np.isin(evid[r], (3, 4)))  # a record's reset count (incl. own)
            d = r[np.isin(evid[r], (1, 4))]
            if not len(d):
                continue
            k = [np.arange(max(int(addl[j]), 0) + 1) if ii[j] > 0 else np.zeros(1, int)
                 for j in d]
            rec = np.repeat(d, [len(x) for x in k])
            td = t[rec] + np.concatenate(k) * ii[rec]
            ep = epoch[rec - a]
            seen = ((td[None, :] <= t[r, None] + 1e-9) & (rec[None, :] <= r[:, None])
                    & (ep[None, :] == epoch[:, None]))
            last = np.where(seen, td[None, :], -np.inf).max(axis=1)
            out[r] = np.where(np.isfinite(last), t[r] - last, np.nan)
        return out


# --------------------------------------------------------------------------- helpers


def _where(source: str, rows: np.ndarray, i: int, column: str | None = None) -> str:
    loc = f"{source}, row {int(rows[i])}"
    return loc if column is None else f"{loc}, column {column}"


def _fmt(x: float) -> str:
    """A number as it would be written in the file: ``3``, ``2.5``, ``-1``."""
    if math.isnan(x):
        return "a missing value"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def _parse_cell(v: object) -> float | None:
    """A cell as a float (NaN when missing), or None when it is not a number."""
    if isinstance(v, str):
        s = v.strip()
        if s in ("", "."):
            return math.nan
        if _NUMBER.fullmatch(s) is None:
            return None
        f = float(s.replace("d", "e").replace("D", "e"))
        return None if math.isinf(f) else f
    if v is None or v is pd.NA or v is pd.NaT:
        return math.nan
    if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real):
        return None
    f = float(v)
    return None if math.isinf(f) else f


def _parse_column(values: Sequence[object] | pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Parse one column; return (float64 values with NaN for missing, bool mask of bad cells)."""
    if (
        isinstance(values, pd.Series)
        and pd.api.types.is_numeric_dtype(values.dtype)
        and not (pd.api.types.is_bool_dtype(values.dtype))
    ):
        arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
        return arr, np.isinf(arr)
    parsed = [_parse_cell(v) for v in values]
    bad = np.fromiter((p is None for p in parsed), dtype=bool, count=len(parsed))
    arr = np.fromiter(
        (math.nan if p is None else p for p in parsed), dtype=np.float64, count=len(parsed)
    )
    return arr, bad


def _check_header(source: str, raw: Sequence[str], header_row: int) -> list[str]:
    """Upper-case the column names; reject empty and duplicate names and missing ID/TIME."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for j, r in enumerate(raw, start=1):
        name = r.strip().upper()
        if not name:
            raise DatasetError(
                f"{source}, row {header_row}, column {j}: expected a column name, "
                "got an empty field"
            )
        if name in seen:
            k = seen[name]
            raise DatasetError(
                f"{source}, row {header_row}, column {j}: expected a unique column name, "
                f"got {r.strip()!r} (same as column {k}, {raw[k - 1].strip()!r})"
            )
        seen[name] = j
        names.append(name)
    for req in REQUIRED:
        if req not in seen:
            raise DatasetError(
                f"{source}, row {header_row}: expected a column {req}, "
                f"got columns {', '.join(names)}"
            )
    return names


Rule = tuple[np.ndarray, Callable[[int], str]]


def _first_error(rules: Sequence[Rule]) -> str | None:
    """Message of the earliest failing record; among rules failing there, the first listed."""
    best: tuple[int, int] | None = None
    for k, (mask, _) in enumerate(rules):
        hits = np.flatnonzero(mask)
        if hits.size and (best is None or hits[0] < best[0]):
            best = (int(hits[0]), k)
    if best is None:
        return None
    return rules[best[1]][1](best[0])


# --------------------------------------------------------------------------- core


def _build(
    source: str,
    names: list[str],
    header_row: int,
    rows: np.ndarray,
    columns: Sequence[Sequence[object] | pd.Series],
    n_fields: np.ndarray | None = None,
    width: int = 0,
) -> Dataset:
    """Parse, validate and complete the columns of a table whose header is already checked.

    ``n_fields`` (file input only) is the number of fields of each record, ``width`` that of
    the header; records of another width are reported as ragged.
    """
    n = len(rows)
    if n == 0:
        raise DatasetError(
            f"{source}: expected at least one data record after the header "
            f"(row {header_row}), got none"
        )
    raw = dict(zip(names, columns, strict=True))
    vals: dict[str, np.ndarray] = {}
    bad = np.zeros((len(names), n), dtype=bool)
    for j, name in enumerate(names):
        vals[name], bad[j] = _parse_column(columns[j])

    def at(i: int, col: str | None = None) -> str:
        return _where(source, rows, i, col)

    def col(name: str, default: float = 0.0) -> np.ndarray:
        arr = vals.get(name)
        return np.full(n, default) if arr is None else np.where(np.isnan(arr), default, arr)

    nan = np.full(n, np.nan)
    ids, time = vals["ID"], vals["TIME"]
    amt, cmt, rate = col("AMT"), col("CMT"), col("RATE")
    ii, addl, ss = col("II"), col("ADDL"), col("SS")
    evid_in, mdv_in = vals.get("EVID", nan), vals.get("MDV", nan)
    derived = np.where(amt > 0, 1.0, np.where(mdv_in == 1, 2.0, 0.0))
    evid = np.where(np.isnan(evid_in), derived, evid_in)
    mdv = np.where(np.isnan(mdv_in), (evid != 0).astype(np.float64), mdv_in)
    dose = (evid == 1) | (evid == 4)
    ss_infusion = (ss == 1) & (amt == 0) & (rate > 0) & (ii == 0)

    prev_id = np.concatenate(([np.nan], ids[:-1]))
    prev_time = np.concatenate(([np.nan], time[:-1]))
    same_id = ids == prev_id
    block_start = ~same_id & ~np.isnan(ids)
    repeated = np.zeros(n, dtype=bool)
    starts = np.flatnonzero(block_start)
    repeated[starts] = pd.Series(ids[starts]).duplicated().to_numpy()

    def is_int(a: np.ndarray) -> np.ndarray:
        return a == np.floor(a)

    def ragged_msg(i: int) -> str:
        assert n_fields is not None
        return f"{at(i)}: expected {width} fields (as in the header), got {n_fields[i]}"

    def bad_msg(i: int) -> str:
        j = int(np.argmax(bad[:, i]))
        cell = raw[names[j]][i]
        return f"{at(i, names[j])}: expected a number or '.', got {str(cell).strip()!r}"

    def contiguity_msg(i: int) -> str:
        first = int(np.flatnonzero(ids == ids[i])[0])
        end = first
        while end + 1 < n and ids[end + 1] == ids[i]:
            end += 1
        return (
            f"{at(i, 'ID')}: expected the records of ID {_fmt(ids[i])} to be contiguous "
            f"(they ended at row {rows[end]}), got ID {_fmt(ids[i])} again after "
            f"ID {_fmt(ids[i - 1])}"
        )

    def got(name: str, what: str) -> Callable[[int], str]:
        return lambda i: f"{at(i, name)}: expected {what}, got {_fmt(vals[name][i])}"

    def non_dose(name: str, arr: np.ndarray) -> Rule:
        def msg(i: int) -> str:
            return (
                f"{at(i, name)}: expected {name} 0 or '.' on a non-dose record "
                f"(EVID {_fmt(evid[i])}), got {_fmt(arr[i])}"
            )

        return ~dose & (arr != 0), msg

    def need_ii(name: str, arr: np.ndarray, mask: np.ndarray) -> Rule:
        def msg(i: int) -> str:
            why = f"because {name} is {_fmt(arr[i])}"
            return f"{at(i, 'II')}: expected II > 0 {why}, got {_fmt(ii[i])}"

        return mask, msg

    no = np.zeros(n, dtype=bool)
    amt_in = vals.get("AMT", nan)
    rules: list[Rule] = [
        (no if n_fields is None else n_fields != width, ragged_msg),
        (bad.any(axis=0), bad_msg),
        (np.isnan(ids), lambda i: f"{at(i, 'ID')}: expected an ID, got a missing value"),
        (np.isnan(time), lambda i: f"{at(i, 'TIME')}: expected a TIME, got a missing value"),
        (time < 0, got("TIME", "TIME >= 0")),
        (repeated, contiguity_msg),
        (
            same_id & (time < prev_time) & (evid != 3) & (evid != 4),
            lambda i: (
                f"{at(i, 'TIME')}: expected TIME >= {_fmt(prev_time[i])} "
                f"(previous record of ID {_fmt(ids[i])}), got {_fmt(time[i])}"
            ),
        ),
        (
            ~np.isnan(evid_in) & ~np.isin(evid_in, (0, 1, 2, 3, 4)),
            got("EVID", "EVID 0, 1, 2, 3 or 4"),
        ),
        (
            ~np.isnan(mdv_in) & ~np.isin(mdv_in, (0, 1)),
            got("MDV", "MDV 0 or 1"),
        ),
        (
            (mdv_in == 0) & (evid != 0),
            lambda i: (
                f"{at(i, 'MDV')}: expected MDV 1 on a non-observation record "
                f"(EVID {_fmt(evid[i])}), got 0"
            ),
        ),
        ((cmt < 0) | ~is_int(cmt), got("CMT", "a non-negative integer")),
        (~np.isin(ss, (0, 1, 2)), got("SS", "SS 0, 1 or 2")),
        ((addl < 0) | ~is_int(addl), got("ADDL", "a non-negative integer")),
        (amt < 0, got("AMT", "AMT >= 0")),
        (ii < 0, got("II", "II >= 0")),
        ((rate < 0) & (rate != -1) & (rate != -2), got("RATE", "RATE >= 0, -1 or -2")),
        non_dose("AMT", amt),
        non_dose("SS", ss),
        non_dose("ADDL", addl),
        (
            dose & ~(amt > 0) & ~ss_infusion,
            lambda i: (
                f"{at(i, 'AMT')}: expected AMT > 0 on a dose record (EVID {_fmt(evid[i])}), "
                f"got {_fmt(amt_in[i])}"
            ),
        ),
        need_ii("ADDL", addl, (addl > 0) & ~(ii > 0)),
        need_ii("SS", ss, (ss > 0) & ~(ii > 0) & ~ss_infusion),
    ]
    message = _first_error(rules)
    if message is not None:
        raise DatasetError(message)

    out: dict[str, np.ndarray] = {
        "ID": ids, "TIME": time, "EVID": evid, "AMT": amt, "CMT": cmt, "RATE": rate,
        "II": ii, "ADDL": addl, "SS": ss, "MDV": mdv, "DV": vals.get("DV", nan),
    }  # fmt: skip
    for name in names:
        if name not in out:
            out[name] = vals[name]
    data = pd.DataFrame({k: np.asarray(v, dtype=np.float64) for k, v in out.items()})
    return Dataset(data=data, source=source, rows=np.asarray(rows, dtype=np.int64))


# --------------------------------------------------------------------------- public API


def read_nonmem(path: str | os.PathLike[str]) -> Dataset:
    """Read and validate a NONMEM CSV dataset (see the module docstring for the rules)."""
    path = Path(path)
    source = path.name
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{source}: file not found ({path})") from None
    except OSError as exc:
        raise DatasetError(f"{source}: cannot read {path}: {exc.strerror}") from None
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        row = blob.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"{source}, row {row}: expected UTF-8 text, got byte 0x{blob[exc.start]:02x}"
        ) from None

    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_row = 0
    names: list[str] = []
    ignore_c = False
    saw_comment = False
    rows: list[int] = []
    records: list[list[str]] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DatasetError(
                f"{source}, row {reader.line_num}: expected well-formed CSV, got {exc}"
            ) from None
        fields = [f.strip() for f in fields]
        if not any(fields):
            continue
        if fields[0].startswith(("#", "@")):
            saw_comment = True
            continue
        if header is None:
            header, header_row = fields, start
            names = _check_header(source, header, header_row)
            ignore_c = names[0] == "C"
            continue
        if ignore_c and fields[0].upper() == "C":
            continue
        rows.append(start)
        records.append(fields)
    if header is None:
        found = "only comments and blank lines" if saw_comment else "an empty file"
        raise DatasetError(f"{source}: expected a header line, got {found}")

    width = len(names)
    n_fields = np.fromiter((len(r) for r in records), dtype=np.int64, count=len(records))
    filler = ["."] * width
    table = [r if len(r) == width else filler for r in records]
    columns: list[Sequence[object]] = (
        [list(c) for c in zip(*table, strict=True)] if table else [[] for _ in names]
    )
    if ignore_c:
        names, columns = names[1:], columns[1:]
    return _build(source, names, header_row, np.asarray(rows), columns, n_fields, width)


def from_frame(df: pd.DataFrame, source: str = "<memory>") -> Dataset:
    """Validate an in-memory table like :func:`read_nonmem` does; ``rows`` are position + 2."""
    raw_names = [str(c) for c in df.columns]
    names = _check_header(source, raw_names, 1)
    rows = np.arange(len(df), dtype=np.int64) + 2
    columns: list[pd.Series] = [df.iloc[:, j].reset_index(drop=True) for j in range(df.shape[1])]
    if names[0] == "C":
        keep = (columns[0].astype(str).str.strip().str.upper() != "C").to_numpy()
        rows = rows[keep]
        columns = [c[keep].reset_index(drop=True) for c in columns[1:]]
        names = names[1:]
    return _build(source, names, 1, rows, columns)


def _format_column(name: str, s: pd.Series) -> list[str]:
    """Cells of one column as text: ``.`` for missing, integers without a decimal point."""
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        a = s.to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isinf(a).any():
            raise ValueError(f"cannot write column {name}: it holds an infinite value")
        out = np.full(len(a), ".", dtype=object)
        finite = ~np.isnan(a)
        integral = finite & (np.abs(a) < 1e15) & (a == np.floor(a))
        out[integral] = [str(int(x)) for x in a[integral]]
        other = finite & ~integral
        out[other] = [repr(float(x)) for x in a[other]]
        return list(out)
    return ["." if pd.isna(v) else str(v) for v in s]


def write_nonmem(dataset_or_df: Dataset | pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a dataset (or a plain frame, as is) as NONMEM CSV, atomically.

    Column names are written in upper case, missing values as ``.``, whole numbers without a
    decimal point and other numbers with full (round-trip) precision.
    """
    df = dataset_or_df.data if isinstance(dataset_or_df, Dataset) else dataset_or_df
    header = [str(c).strip().upper() for c in df.columns]
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise ValueError(f"cannot write {path}: duplicate column names {', '.join(dupes)}")
    cells = [_format_column(h, df.iloc[:, j]) for j, h in enumerate(header)]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(zip(*cells, strict=True))


def for_model(data: Dataset | pd.DataFrame, model) -> Dataset:
    """``data`` as a Dataset checked against ``model`` (a :class:`pkpd.model.Model`):
    compartments, modeled rates/durations, covariates (defaults filled), dose compartment."""
    ds = data if isinstance(data, Dataset) else from_frame(data)
    return check_against_model(
        ds, compartments=set(model.cmt_numbers), modeled_rate=model.modeled_rate_cmts,
        modeled_duration=model.modeled_duration_cmts,
        covariates={k: c.default for k, c in model.covariates.items()},
        default_dose_cmt=model.default_dose_cmt) or ds


def check_against_model(
    ds: Dataset,
    *,
    compartments: Collection[int],
    modeled_rate: Collection[int],
    modeled_duration: Collection[int],
    covariates: Mapping[str, float | None],
    default_dose_cmt: int,
) -> Dataset:
    """Check ``ds`` against a model and return a copy with the model's covariates filled in.

    Errors (first in file order): a covariate the model needs is absent and has no default; a
    non-zero CMT that is not a model compartment; RATE -1 on a dose (EVID 1/4) into a
    compartment without a modeled rate (``R<n>``) or RATE -2 without a modeled duration
    (``D<n>``), the dose compartment being CMT or ``default_dose_cmt`` when CMT is 0; a
    covariate without default that is missing on every record of a subject.

    Filling, per subject, for each covariate in ``covariates``: missing values take the next
    non-missing value of that subject (next observation carried backward, NONMEM's convention
    that a record's covariates apply to the interval ending at it), trailing ones the last
    value (last observation carried forward); a subject with no value at all, or an absent
    column, takes the default.  Other columns are unchanged.
    """
    df = ds.data
    comps = {int(c) for c in compartments}
    if default_dose_cmt not in comps:
        raise ValueError(
            f"default_dose_cmt {default_dose_cmt} is not a model compartment "
            f"({', '.join(map(str, sorted(comps)))})"
        )
    covs = {str(k).strip().upper(): v for k, v in covariates.items()}
    for name, default in covs.items():
        if name not in df.columns and default is None:
            raise DatasetError(
                f"{ds.source}: expected a column {name} (a covariate of the model, "
                f"no default given), got columns {', '.join(map(str, df.columns))}"
            )

    ids = df["ID"]
    cmt = df["CMT"].to_numpy()
    rate = df["RATE"].to_numpy()
    evid = df["EVID"].to_numpy()
    dose = (evid == 1) | (evid == 4)
    target = np.where(cmt == 0, default_dose_cmt, cmt)
    first_of_subject = ~ids.duplicated().to_numpy()
    comp_list = ", ".join(map(str, sorted(comps)))

    def modeled(code: int, symbol: str, allowed: Collection[int], what: str) -> Rule:
        mask = dose & (rate == code) & ~np.isin(target, sorted({int(c) for c in allowed}))

        def msg(i: int) -> str:
            c = _fmt(target[i])
            return (
                f"{ds.where(i, 'RATE')}: expected RATE {code} only on doses into a compartment "
                f"with a modeled {what}, got a dose into compartment {c} "
                f"(model defines no {symbol}{c})"
            )

        return mask, msg

    def all_missing(name: str) -> Rule:
        present = df[name].notna().groupby(ids, sort=False).transform("any").to_numpy()
        mask = first_of_subject & ~present

        def msg(i: int) -> str:
            return (
                f"{ds.where(i, name)}: expected at least one value of {name} for ID "
                f"{_fmt(ids.iloc[i])} (no default given), got only missing values"
            )

        return mask, msg

    rules: list[Rule] = [
        (
            (cmt != 0) & ~np.isin(cmt, sorted(comps)),
            lambda i: (
                f"{ds.where(i, 'CMT')}: expected CMT 0 or a model compartment ({comp_list}), "
                f"got {_fmt(cmt[i])}"
            ),
        ),
        modeled(-1, "R", modeled_rate, "rate"),
        modeled(-2, "D", modeled_duration, "duration"),
    ]
    rules += [all_missing(k) for k, v in covs.items() if v is None]
    message = _first_error(rules)
    if message is not None:
        raise DatasetError(message)

    out = df.copy()
    for name, default in covs.items():
        if name not in out.columns:
            out[name] = np.float64(default)  # default is not None: checked above
            continue
        col = out[name].astype(np.float64)
        col = col.groupby(ids, sort=False).bfill()
        col = col.groupby(ids, sort=False).ffill()
        if default is not None:
            col = col.fillna(float(default))
        out[name] = col
    return dataclasses.replace(ds, data=out)
