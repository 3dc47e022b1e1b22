"""Model files: one TOML document per model, parsed into an immutable :class:`Model`.

A model file is the single source of truth for a model: parameters (typical value, unit,
between-subject variability, source), covariates (dataset columns), compartments, ODEs and
outputs written as text that sympy parses, and the NONMEM PK-record bindings (``ALAGn``,
``Fn``, ``Rn``, ``Dn``). Simulation and likelihood code are derived from it. The format is
specified in ``models/README.md``.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import sympy as sp
from sympy.parsing.sympy_parser import (
    auto_number,
    auto_symbol,
    convert_xor,
    parse_expr,
)

__all__ = [
    "Compartment",
    "Covariate",
    "LinearForm",
    "Model",
    "ModelError",
    "Output",
    "Parameter",
    "load_model",
    "MODELS_DIR",
]

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SECTIONS = (
    "model", "parameters", "covariates", "individual", "compartments", "derived", "odes",
    "dosing", "outputs",
)
TIME = sp.Symbol("t", real=True)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_DOSING_KEY = re.compile(r"^(ALAG|F|R|D)(\d+)$")
_FUNCTIONS: dict[str, object] = {
    "exp": sp.exp, "EXP": sp.exp, "log": sp.log, "LOG": sp.log, "sqrt": sp.sqrt,
    "SQRT": sp.sqrt, "Max": sp.Max, "Min": sp.Min, "max": sp.Max, "min": sp.Min,
    "abs": sp.Abs, "ABS": sp.Abs, "Piecewise": sp.Piecewise, "Heaviside": sp.Heaviside,
    "tanh": sp.tanh, "pi": sp.pi,
}
_RESERVED = {"t"} | set(_FUNCTIONS)
# what the parser may evaluate: numbers, symbols and the functions above, nothing else
_GLOBALS = {"__builtins__": {}, "Integer": sp.Integer, "Float": sp.Float,
            "Rational": sp.Rational, "Symbol": sp.Symbol}
_UNSAFE = re.compile(r"__|[A-Za-z_)\]]\s*\.|[\[\]{};:@'\"`\\]|\blambda\b")


class ModelError(ValueError):
    """A model file is malformed; the message names the file, line, section and key."""


@dataclass(frozen=True)
class Parameter:
    """A population parameter (NONMEM THETA) with its between-subject variability.

    ``omega2`` is the variance of the log-normal random effect η (individual value =
    typical value × exp(η)); 0 means no IIV.
    """

    name: str
    value: float
    unit: str
    omega2: float = 0.0
    source: str = ""
    description: str = ""
    fixed: bool = False
    lower: float | None = None
    upper: float | None = None
    assumption: bool = False

    @property
    def cv_percent(self) -> float:
        """IIV as CV % = 100·sqrt(exp(ω²) − 1)."""
        return 100.0 * math.sqrt(math.expm1(self.omega2))


@dataclass(frozen=True)
class Covariate:
    """A dataset column the model reads (per record); ``default`` fills an absent column."""

    name: str
    unit: str = ""
    default: float | None = None
    description: str = ""


@dataclass(frozen=True)
class Compartment:
    """A state of the ODE system; ``cmt`` is its NONMEM CMT number (1-based)."""

    name: str
    cmt: int
    unit: str = ""
    description: str = ""
    init: sp.Expr = sp.Integer(0)


@dataclass(frozen=True)
class Output:
    """A named model output (algebraic function of states, parameters and covariates)."""

    name: str
    expr: sp.Expr
    unit: str = ""
    description: str = ""


@dataclass(frozen=True)
class LinearForm:
    """dx/dt = A·x + c with A and c free of states and time (a linear time-invariant system)."""

    A: sp.Matrix
    c: sp.Matrix
    blocks: tuple[tuple[int, ...], ...]  # strongly connected components, in topological order

    @property
    def closed_form(self) -> bool:
        """True when every block has ≤ 3 states: eigenvalues then have closed forms."""
        return all(len(b) <= 3 for b in self.blocks)


@dataclass(frozen=True)
class Model:
    """A parsed model file. Expressions in ``odes``, ``outputs``, ``dosing`` and ``init`` use
    individual parameter values (with covariate model and IIV applied), covariates and states;
    ``[derived]`` statements are already substituted in."""

    name: str
    description: str
    parameters: Mapping[str, Parameter]
    covariates: Mapping[str, Covariate]
    individual: Mapping[str, sp.Expr]  # covariate model: typical value for the individual
    compartments: tuple[Compartment, ...]
    odes: Mapping[str, sp.Expr]
    dosing: Mapping[str, sp.Expr]  # keys ALAGn, Fn, Rn, Dn
    outputs: Mapping[str, Output]
    time_unit: str = "h"
    amount_unit: str = "mg"
    source: str = ""
    path: str = "<memory>"
    meta: Mapping[str, object] = field(default_factory=dict)

    # -- structure ---------------------------------------------------------------------
    @property
    def states(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.compartments)

    @property
    def n_states(self) -> int:
        return len(self.compartments)

    @cached_property
    def state_symbols(self) -> tuple[sp.Symbol, ...]:
        return tuple(sp.Symbol(s, real=True) for s in self.states)

    @property
    def cmt_numbers(self) -> dict[int, int]:
        """NONMEM CMT number → state index (0-based)."""
        return {c.cmt: i for i, c in enumerate(self.compartments)}

    @property
    def default_dose_cmt(self) -> int:
        """CMT number that doses go to when CMT is 0 or absent (the first compartment)."""
        flagged = [c.cmt for c in self.compartments if self.meta.get("dose_cmt") == c.name]
        return flagged[0] if flagged else self.compartments[0].cmt

    @property
    def modeled_rate_cmts(self) -> set[int]:
        return {int(k[1:]) for k in self.dosing if k.startswith("R")}

    @property
    def modeled_duration_cmts(self) -> set[int]:
        return {int(k[1:]) for k in self.dosing if k.startswith("D")}

    @property
    def theta(self) -> dict[str, float]:
        """Typical values (THETA) by name."""
        return {k: p.value for k, p in self.parameters.items()}

    @cached_property
    def linear(self) -> LinearForm | None:
        """The LTI form of the ODE system, or None when it is nonlinear or time-varying."""
        x = sp.Matrix(self.state_symbols)
        f = sp.Matrix([self.odes[s] for s in self.states])
        jac = f.jacobian(x)
        state_set = set(self.state_symbols) | {TIME}
        if any(e.free_symbols & state_set for e in jac):
            return None
        c = f.subs({s: 0 for s in self.state_symbols})
        if any(TIME in e.free_symbols for e in c):
            return None
        n = len(self.states)
        adj = [[j for j in range(n) if jac[i, j] != 0 and i != j] for i in range(n)]
        return LinearForm(A=jac, c=c, blocks=_scc_topological(adj))

    @cached_property
    def linear_part(self) -> tuple[tuple[int, ...], LinearForm] | None:
        """The states of a nonlinear model that form a linear time-invariant subsystem driven
        by nothing else and entered by the doses (typically the PK compartments), with that
        subsystem's LTI form; None when there are none. Solvers give these states their exact
        solution and integrate only the rest. Pure accumulators (dx/dt free of x, e.g.
        cumulative hazards) stay with the rest: they are not stiff and would only repeat the
        eigenvalue 0."""
        xs = self.state_symbols
        f = [self.odes[s] for s in self.states]
        lti = set()
        for i, e in enumerate(f):
            grads = [sp.diff(e, x) for x in xs]
            if TIME in e.free_symbols or any(g.free_symbols & (set(xs) | {TIME})
                                             for g in grads):
                continue
            lti.add(i)
        keep = {i for i in lti if sp.diff(f[i], xs[i]) != 0}
        while True:  # closed: every state they depend on is in the set
            drop = {i for i in keep if any(sp.diff(f[i], xs[j]) != 0
                                           for j in range(len(xs)) if j not in keep)}
            if not drop:
                break
            keep -= drop
        # only the subsystem the doses enter (e.g. PK, not a slowly growing resistant clone
        # that happens to be linear): the states connected to the dose compartment
        dose = self.cmt_numbers[self.default_dose_cmt]
        if dose not in keep:
            return None
        linked, frontier = {dose}, [dose]
        while frontier:
            i = frontier.pop()
            for j in keep - linked:
                if sp.diff(f[i], xs[j]) != 0 or sp.diff(f[j], xs[i]) != 0:
                    linked.add(j)
                    frontier.append(j)
        keep = linked
        if len(keep) == len(xs):
            return None
        idx = tuple(sorted(keep))
        sub = [xs[i] for i in idx]
        fs = sp.Matrix([f[i] for i in idx])
        jac = fs.jacobian(sp.Matrix(sub))
        c = fs.subs({x: 0 for x in sub})
        adj = [[j for j in range(len(idx)) if jac[i, j] != 0 and i != j]
               for i in range(len(idx))]
        return idx, LinearForm(A=jac, c=c, blocks=_scc_topological(adj))

    # -- numerics ----------------------------------------------------------------------
    @cached_property
    def _parameter_symbols(self) -> tuple[sp.Symbol, ...]:
        return tuple(sp.Symbol(p, real=True) for p in self.parameters)

    @cached_property
    def _covariate_symbols(self) -> tuple[sp.Symbol, ...]:
        return tuple(sp.Symbol(c, real=True) for c in self.covariates)

    def compile(self, expr: sp.Expr, *, states: bool = False, time: bool = False) -> Callable:
        """numpy function of (params dict, covariates dict[, states][, t]).

        ``states`` is state-major: ``x[i]`` holds the values of state i (any shape that
        broadcasts with the parameters and covariates).
        """
        key = (sp.ImmutableMatrix(expr) if isinstance(expr, sp.MatrixBase) else expr, states,
               time)
        cached = self._compiled.get(key)
        if cached is not None:
            return cached
        args = list(self._parameter_symbols) + list(self._covariate_symbols)
        if states:
            args += list(self.state_symbols)
        if time:
            args.append(TIME)
        fn = sp.lambdify(args, expr, modules="numpy", cse=True)
        pnames, cnames = list(self.parameters), list(self.covariates)
        is_matrix = isinstance(expr, sp.MatrixBase)

        def evaluate(params, covs, x=None, t=None):
            vals = [params[k] for k in pnames] + [covs[k] for k in cnames]
            if states:
                vals += [x[i] for i in range(self.n_states)]
            if time:
                vals.append(t)
            if is_matrix:
                return np.asarray(fn(*vals), dtype=float)
            shape = np.broadcast_shapes(*(np.shape(v) for v in vals)) if vals else ()
            return np.broadcast_to(np.asarray(fn(*vals), dtype=float), shape)

        self._compiled[key] = evaluate
        return evaluate

    def __getstate__(self) -> dict:
        """Pickle without generated functions (rebuilt on demand): for multiprocess samplers
        and Dask workers."""
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_compiled", "_individual_fns")}

    @cached_property
    def _compiled(self) -> dict:
        """Functions already generated by :meth:`compile` (lambdify is slow)."""
        return {}

    def typical_individual(self, theta: Mapping[str, float], covs: Mapping[str, np.ndarray]
                           ) -> dict[str, np.ndarray]:
        """Covariate model: each parameter's typical value for individuals with ``covs``."""
        out = {}
        for name in self.parameters:
            if name in self.individual:
                out[name] = self._individual_fns[name](theta, covs)
            else:
                shape = np.broadcast_shapes(*(np.shape(v) for v in covs.values())) if covs else ()
                out[name] = np.broadcast_to(np.asarray(theta[name], dtype=float), shape)
        return out

    @cached_property
    def _individual_fns(self) -> dict[str, Callable]:
        return {k: self.compile(e) for k, e in self.individual.items()}

    def with_values(self, **values: float) -> Model:
        """A copy with some typical values replaced (``--set NAME=VALUE``)."""
        params = dict(self.parameters)
        for k, v in values.items():
            if k not in params:
                raise ModelError(f"{self.path}: unknown parameter {k!r} (model has "
                                 f"{', '.join(params)})")
            try:
                value = float(v)
            except (TypeError, ValueError):
                raise ModelError(f"{self.path}: {k} must be a number, got {v!r}") from None
            p = params[k]
            if (p.lower is not None and value < p.lower) or (p.upper is not None and
                                                              value > p.upper):
                raise ModelError(f"{self.path}: {k} = {value:g} outside [lower, upper] = "
                                 f"[{p.lower}, {p.upper}]")
            params[k] = replace(p, value=value)
        return replace(self, parameters=params)


def _scc_topological(adj: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    """Strongly connected components of a graph (i depends on j when adj[i] has j).

    Tarjan's algorithm; returns components so that a block only depends on earlier ones.
    """
    n = len(adj)
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on: set[int] = set()
    out: list[tuple[int, ...]] = []
    counter = [0]

    def visit(v: int) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(tuple(sorted(comp)))

    for v in range(n):
        if v not in index:
            visit(v)
    return tuple(out)


# ---------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------
class _Source:
    """The file text, to point error messages at the line that holds a key."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, section: str, key: str | None = None) -> int | None:
        current = None
        for i, raw in enumerate(self.lines, 1):
            line = raw.split("#", 1)[0].strip()
            m = re.match(r"^\[\s*([A-Za-z0-9_.]+)\s*\]$", line)
            if m:
                current = m.group(1)
                if key is None and current == section:
                    return i
                continue
            if key is not None and current == section and re.match(
                rf"^\"?{re.escape(key)}\"?\s*=", line
            ):
                return i
            if key is not None and current == f"{section}.{key}":
                return i
        return None

    def error(self, section: str, key: str | None, message: str) -> ModelError:
        line = self.line_of(section, key)
        where = f"{self.path}, line {line}" if line else self.path
        what = f"[{section}]" + (f" {key}" if key else "")
        return ModelError(f"{where}, {what}: {message}")


def load_model(path_or_name: str | Path) -> Model:
    """Load a model file: a path, or the name of a model shipped under ``models/``."""
    path = _resolve(path_or_name)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model file ({exc.strerror})") from None
    shipped = path.resolve().parent == MODELS_DIR.resolve()
    if not shipped:
        return parse_model(text, str(path))
    # shipped models (which may use each other) are parsed once per process while unchanged
    key = (str(path), text, tuple((f.name, f.stat().st_mtime_ns)
                                  for f in sorted(MODELS_DIR.glob("*.toml"))))
    model = _SHIPPED.get(key)
    if model is None:
        model = _SHIPPED[key] = parse_model(text, str(path))
    return model


_SHIPPED: dict[tuple, Model] = {}


def _resolve(path_or_name: str | Path) -> Path:
    p = Path(path_or_name)
    candidates = [p, p.with_suffix(".toml")]
    if len(p.parts) == 1:  # a bare name: also look among the shipped models
        candidates += [MODELS_DIR / p.name, MODELS_DIR / f"{p.name}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    available = sorted(f.stem for f in MODELS_DIR.glob("*.toml"))
    raise ModelError(f"{path_or_name}: no such model file (models shipped: "
                     f"{', '.join(available)})")


def parse_model(text: str, path: str = "<memory>") -> Model:
    """Parse model-file text (TOML) into a :class:`Model`; errors name file, line and key."""
    src = _Source(path, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"{path}: not valid TOML: {exc}") from None
    for section in doc:
        if section not in SECTIONS:
            raise src.error(section, None, f"unknown section (expected one of "
                            f"{', '.join(SECTIONS)})")
    if "model" not in doc:
        raise ModelError(f"{path}: missing section [model]")
    for section, body in doc.items():
        if not isinstance(body, dict):
            raise ModelError(f"{path}: {section} must be a section [{section}], got {body!r}")
    head = doc["model"]
    if not isinstance(head.get("name"), str):
        raise src.error("model", "name", "expected a string name")
    doc = _with_used_models(doc, src)
    for section in ("parameters", "compartments", "odes", "outputs"):  # own or used models'
        if section not in doc:
            raise ModelError(f"{path}: missing section [{section}]")

    # names ---------------------------------------------------------------------------
    seen: dict[str, str] = {}

    def declare(section: str, name: str) -> None:
        if not _NAME.match(name):
            raise src.error(section, name, "names must start with a letter and hold only "
                            "letters, digits and _")
        if name in _RESERVED:
            raise src.error(section, name, f"{name!r} is reserved (time or a function)")
        if name in seen:
            raise src.error(section, name, f"name already declared in [{seen[name]}]")
        seen[name] = section

    params: dict[str, Parameter] = {}
    for name, spec in doc["parameters"].items():
        declare("parameters", name)
        params[name] = _parameter(src, name, spec)
    covs: dict[str, Covariate] = {}
    for name, spec in doc.get("covariates", {}).items():
        declare("covariates", name.upper())
        if not isinstance(spec, dict):
            spec = {"description": str(spec)}
        extra = set(spec) - {"unit", "default", "description", "source"}
        if extra:
            raise src.error("covariates", name, f"unknown field {sorted(extra)[0]!r} "
                            "(expected unit, default, description, source)")
        default = spec.get("default")
        if default is not None and not isinstance(default, int | float):
            raise src.error("covariates", name, f"default must be a number, got {default!r}")
        covs[name.upper()] = Covariate(name.upper(), str(spec.get("unit", "")),
                                       None if default is None else float(default),
                                       str(spec.get("description", "")))
    cmts: list[tuple[str, dict]] = []
    for i, (name, spec) in enumerate(doc["compartments"].items(), 1):
        declare("compartments", name)
        if isinstance(spec, str):
            spec = {"description": spec}
        if not isinstance(spec, dict):
            raise src.error("compartments", name, "expected a table or a description string")
        cmt = spec.get("cmt", i)
        if not isinstance(cmt, int) or isinstance(cmt, bool) or cmt < 1:
            raise src.error("compartments", name, f"cmt must be a positive integer, got {cmt!r}")
        if "dose" in spec and not isinstance(spec["dose"], bool):
            raise src.error("compartments", name, f"dose must be true or false, got "
                            f"{spec['dose']!r}")
        cmts.append((name, {**spec, "cmt": cmt}))
    numbers = [s["cmt"] for _, s in cmts]
    if len(set(numbers)) != len(numbers):
        dup = next(n for n in numbers if numbers.count(n) > 1)
        name = [nm for nm, s in cmts if s["cmt"] == dup][1]
        raise src.error("compartments", name, f"cmt {dup} is used twice")
    if not cmts:
        raise src.error("compartments", None, "at least one compartment is needed")

    psym = {k: sp.Symbol(k, real=True) for k in params}
    csym = {k: sp.Symbol(k, real=True) for k in covs}
    ssym = {k: sp.Symbol(k, real=True) for k, _ in cmts}

    def parse(section: str, key: str, text_: object, allowed: dict[str, sp.Symbol],
              what: str, time_ok: bool = True) -> sp.Expr:
        if isinstance(text_, int | float) and not isinstance(text_, bool):
            if not math.isfinite(text_):
                raise src.error(section, key, f"expected a finite number, got {text_!r}")
            return sp.Float(text_) if isinstance(text_, float) else sp.Integer(text_)
        if not isinstance(text_, str) or not text_.strip():
            raise src.error(section, key, f"expected an equation as a string, got {text_!r}")
        if _UNSAFE.search(text_):
            raise src.error(section, key, f"cannot parse {text_!r} (only names, numbers, "
                            "operators and function calls are allowed)")
        local = {**_FUNCTIONS, **allowed, "t": TIME}
        try:
            expr = parse_expr(text_, local_dict=local, global_dict=dict(_GLOBALS),
                              transformations=(auto_symbol, auto_number, convert_xor),
                              evaluate=True)
        except Exception as exc:  # sympy raises many types for bad syntax
            raise src.error(section, key, f"cannot parse {text_!r} ({type(exc).__name__}: "
                            f"{exc})") from None
        if not isinstance(expr, sp.Expr):
            raise src.error(section, key, f"{text_!r} is not an expression")
        known = set(allowed.values()) | ({TIME} if time_ok else set())
        unknown = sorted(str(s) for s in expr.free_symbols - known)
        if unknown:
            if unknown[0] == "t":
                raise src.error(section, key, f"time t cannot be used here ({text_!r})")
            raise src.error(section, key, f"unknown symbol {unknown[0]!r} in {text_!r} "
                            f"(allowed here: {what})")
        if expr.has(sp.I, sp.zoo, sp.nan, sp.oo, sp.E, sp.S.Exp1):
            raise src.error(section, key, f"{text_!r} is not a finite real expression")
        return expr

    # covariate model ---------------------------------------------------------------------
    individual: dict[str, sp.Expr] = {}
    for name, text_ in doc.get("individual", {}).items():
        if name not in params:
            raise src.error("individual", name, "left-hand side must be a parameter declared "
                            "in [parameters]")
        individual[name] = parse("individual", name, text_, {**psym, **csym},
                                 "parameters (typical values) and covariates", time_ok=False)

    # derived statements, substituted in order ------------------------------------------
    derived: dict[sp.Symbol, sp.Expr] = {}
    for name, text_ in doc.get("derived", {}).items():
        declare("derived", name)
        expr = parse("derived", name, text_, {**psym, **csym,
                     **{str(k): k for k in derived}}, "parameters, covariates, earlier derived")
        derived[sp.Symbol(name, real=True)] = expr.subs(derived)
    dsym = {str(k): k for k in derived}
    scope = {**psym, **csym, **dsym}

    def subs(e: sp.Expr) -> sp.Expr:
        return e.subs(derived) if derived else e

    compartments = []
    for name, spec in cmts:
        init = subs(parse("compartments", name, spec.get("init", 0), scope,
                          "parameters, covariates, derived", time_ok=False))
        if TIME in init.free_symbols:
            raise src.error("compartments", name, "init cannot depend on time t")
        extra = set(spec) - {"cmt", "unit", "description", "init", "dose"}
        if extra:
            raise src.error("compartments", name, f"unknown field {sorted(extra)[0]!r} "
                            "(expected cmt, unit, description, init, dose)")
        compartments.append(Compartment(name, spec["cmt"], str(spec.get("unit", "")),
                                        str(spec.get("description", "")), init))
    dose_flags = [n for n, s in cmts if s.get("dose")]
    if len(dose_flags) > 1:
        raise src.error("compartments", dose_flags[1], "only one compartment can be the "
                        "default dose compartment (dose = true)")

    outputs: dict[str, Output] = {}
    osym: dict[str, sp.Symbol] = {}
    for name, spec in doc["outputs"].items():
        declare("outputs", name)
        if isinstance(spec, str):
            spec = {"expr": spec}
        if not isinstance(spec, dict) or "expr" not in spec:
            raise src.error("outputs", name, "expected a table with expr (and unit)")
        extra = set(spec) - {"expr", "unit", "description"}
        if extra:
            raise src.error("outputs", name, f"unknown field {sorted(extra)[0]!r} "
                            "(expected expr, unit, description)")
        expr = subs(parse("outputs", name, spec["expr"], {**scope, **ssym, **osym},
                          "states, parameters, covariates, derived, earlier outputs, t"))
        expr = expr.subs({osym[k]: outputs[k].expr for k in outputs})
        osym[name] = sp.Symbol(name, real=True)
        outputs[name] = Output(name, expr, str(spec.get("unit", "")),
                               str(spec.get("description", "")))
    if not outputs:
        raise src.error("outputs", None, "at least one output is needed")

    odes: dict[str, sp.Expr] = {}
    for name, text_ in doc["odes"].items():
        if name not in ssym:
            raise src.error("odes", name, "no such compartment (declare it in [compartments])")
        expr = subs(parse("odes", name, text_, {**scope, **ssym, **osym},
                          "states, parameters, covariates, derived, outputs, t"))
        odes[name] = expr.subs({osym[k]: o.expr for k, o in outputs.items()})
    missing = [n for n, _ in cmts if n not in odes]
    if missing:
        raise src.error("compartments", missing[0], "has no equation in [odes]")

    cmt_numbers = {s["cmt"] for _, s in cmts}
    dosing: dict[str, sp.Expr] = {}
    for key, text_ in doc.get("dosing", {}).items():
        m = _DOSING_KEY.match(key)
        if not m:
            raise src.error("dosing", key, "expected ALAGn, Fn, Rn or Dn with n a CMT number")
        if int(m.group(2)) not in cmt_numbers:
            raise src.error("dosing", key, f"no compartment has cmt {m.group(2)}")
        norm = f"{m.group(1)}{int(m.group(2))}"
        if norm in dosing:
            raise src.error("dosing", key, f"{norm} is given twice")
        dosing[norm] = subs(parse("dosing", key, text_, scope, "parameters, covariates, derived",
                                  time_ok=False))
        if TIME in dosing[norm].free_symbols:
            raise src.error("dosing", key, "dose parameters cannot depend on time t")


    meta = {k: v for k, v in head.items() if k not in {"name", "description", "time_unit",
                                                        "amount_unit", "source"}}
    if dose_flags:
        meta["dose_cmt"] = dose_flags[0]
    return Model(
        name=head["name"], description=str(head.get("description", "")),
        parameters=params, covariates=covs, individual=individual,
        compartments=tuple(compartments), odes=odes, dosing=dosing, outputs=outputs,
        time_unit=str(head.get("time_unit", "h")), amount_unit=str(head.get("amount_unit", "mg")),
        source=str(head.get("source", "")), path=path, meta=meta,
    )


def _with_used_models(doc: dict, src: _Source) -> dict:
    """Merge the models named in ``[model] uses`` (their sections first): a PD model reads
    its PK model's states, parameters and outputs (e.g. CP) without repeating them.

    Used models are collected recursively and each is merged once, so two models that both
    build on ``selinexor_xpo1`` can be used together; a name defined by two different models
    is an error. A ``[derived]`` statement named like a used model's parameter replaces that
    parameter (a reparameterisation, e.g. ``smm_mspike_net``'s KKILL from a net rate).
    """
    order: list[tuple[str, dict, str]] = []  # (path, own sections, model name), dependencies first
    _collect_used(doc, src, order, set())
    merged = {k: dict(v) for k, v in doc.items()}
    owner: dict[tuple[str, str], str] = {}
    base_sections: dict[str, dict] = {}
    for _path, own, name in order:
        for section, body in own.items():
            if section == "model":
                continue
            target = base_sections.setdefault(section, {})
            for key in body:
                if key in target:
                    raise src.error(section, key, f"defined by both used models "
                                    f"{owner[(section, key)]!r} and {name!r}")
                owner[(section, key)] = name
            target.update(body)
    # a [derived] statement may replace a used model's parameter (a reparameterisation,
    # e.g. a kill rate written through a net rate): the parameter is dropped and the
    # statement comes first among the derived ones
    mine_derived = merged.get("derived", {})
    replaced = {k: v for k, v in mine_derived.items()
                if k in base_sections.get("parameters", {})}
    if replaced:
        base_sections["parameters"] = {k: v for k, v in base_sections["parameters"].items()
                                       if k not in replaced}
        merged["derived"] = {k: v for k, v in mine_derived.items() if k not in replaced}
    for section, body in base_sections.items():
        mine = merged.get(section, {})
        for key in mine:
            if key in body:
                raise src.error(section, key, f"already defined by the used model "
                                f"{owner[(section, key)]!r}")
        merged[section] = {**(replaced if section == "derived" else {}), **body, **mine}
    if replaced and "derived" not in base_sections:
        merged["derived"] = {**replaced, **merged.get("derived", {})}
    return merged


def _collect_used(doc: dict, src: _Source, order: list, seen: set[str]) -> None:
    uses = doc["model"].get("uses", [])
    if isinstance(uses, str):
        uses = [uses]
    if not isinstance(uses, list) or not all(isinstance(u, str) for u in uses):
        raise src.error("model", "uses", f"expected a list of model names, got {uses!r}")
    for name in uses:
        base_model = load_model(name)  # validates the used model, with its own locations
        path = str(Path(base_model.path).resolve())
        if path in seen:
            continue
        seen.add(path)
        base_doc = tomllib.loads(Path(path).read_text())
        _collect_used(base_doc, _Source(path, ""), order, seen)
        order.append((path, base_doc, base_model.name))


def _number(v: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _parameter(src: _Source, name: str, spec: object) -> Parameter:
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        raise src.error("parameters", name, "expected a table { value = ..., unit = ... }")
    if not isinstance(spec, dict):
        raise src.error("parameters", name, "expected a table { value = ..., unit = ... }")
    allowed = {"value", "unit", "omega2", "iiv_cv", "source", "description", "fixed", "lower",
               "upper", "assumption"}
    extra = set(spec) - allowed
    if extra:
        raise src.error("parameters", name, f"unknown field {sorted(extra)[0]!r} (expected "
                        f"{', '.join(sorted(allowed))})")
    value = spec.get("value")
    if not _number(value):
        raise src.error("parameters", name, f"value must be a finite number, got {value!r}")
    if "unit" not in spec:
        raise src.error("parameters", name, "unit is required (use \"-\" for dimensionless)")
    if "omega2" in spec and "iiv_cv" in spec:
        raise src.error("parameters", name, "give omega2 or iiv_cv, not both")
    omega2 = spec.get("omega2", 0.0)
    if "iiv_cv" in spec:
        cv = spec["iiv_cv"]
        if not _number(cv) or cv < 0:
            raise src.error("parameters", name, f"iiv_cv must be a percentage >= 0, got {cv!r}")
        omega2 = math.log1p((cv / 100.0) ** 2)
    if not _number(omega2) or omega2 < 0:
        raise src.error("parameters", name, f"omega2 must be a variance >= 0, got {omega2!r}")
    lower, upper = spec.get("lower"), spec.get("upper")
    for bound, v in (("lower", lower), ("upper", upper)):
        if v is not None and not _number(v):
            raise src.error("parameters", name, f"{bound} must be a number, got {v!r}")
    for flag in ("fixed", "assumption"):
        if flag in spec and not isinstance(spec[flag], bool):
            raise src.error("parameters", name, f"{flag} must be true or false, got "
                            f"{spec[flag]!r}")
    if lower is not None and upper is not None and not lower <= value <= upper:
        raise src.error("parameters", name, f"value {value} outside [lower, upper] = "
                        f"[{lower}, {upper}]")
    return Parameter(name, float(value), str(spec["unit"]), float(omega2),
                     str(spec.get("source", "")), str(spec.get("description", "")),
                     bool(spec.get("fixed", False)), lower, upper,
                     bool(spec.get("assumption", False)))
