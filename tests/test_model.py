"""Tests for pkpd.model: shipped models, linear detection, parsing and error messages."""

import math
import re
from pathlib import Path

import pytest
import sympy as sp

from pkpd.model import MODELS_DIR, TIME, Model, ModelError, load_model, parse_model

README = MODELS_DIR / "README.md"


def sym(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


def same(a: sp.Expr, b: sp.Expr) -> bool:
    return sp.simplify(a - b) == 0


# A valid model; the malformed files below are small edits of it (line numbers matter).
BASE = """\
[model]
name = "m"

[parameters]
CL = { value = 5.0, unit = "L/h", iiv_cv = 30 }
V  = { value = 50.0, unit = "L" }
KA = { value = 1.0, unit = "1/h" }

[compartments]
DEPOT   = { cmt = 1, unit = "mg" }
CENTRAL = { cmt = 2, unit = "mg" }

[odes]
DEPOT   = "-KA*DEPOT"
CENTRAL = "KA*DEPOT - CL/V*CENTRAL"

[outputs]
CP = { expr = "CENTRAL/V", unit = "mg/L" }
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def with_section(section: str) -> str:
    """BASE with a section inserted before [outputs]; its first key is on line 18."""
    return edit("[outputs]", f"{section}\n\n[outputs]")


# ------------------------------------------------------------------ shipped models
SHIPPED = {
    "pk_1cmt_iv": (("CENTRAL",), ("CL", "V"), ((0,),)),
    "pk_1cmt_oral": (("DEPOT", "CENTRAL"), ("CL", "V", "KA"), ((0,), (1,))),
    "pk_2cmt_iv": (("CENTRAL", "PERIPHERAL"), ("CL", "V1", "Q", "V2"), ((0, 1),)),
    "pk_2cmt_oral": (("DEPOT", "CENTRAL", "PERIPHERAL"), ("CL", "V2", "Q", "V3", "KA"),
                     ((0,), (1, 2))),
    "pk_3cmt_oral": (("DEPOT", "CENTRAL", "PERIPH1", "PERIPH2"),
                     ("CL", "V2", "Q3", "V3", "Q4", "V4", "KA"), ((0,), (1, 2, 3))),
    "nmtests_1001": (("DEPOT", "CENTRAL"), ("CL", "V", "KA"), ((0,), (1,))),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_structure(name: str) -> None:
    states, params, blocks = SHIPPED[name]
    m = load_model(name)
    assert m.name == name
    assert m.path == str(MODELS_DIR / f"{name}.toml")
    assert m.states == states
    assert tuple(m.parameters) == params
    assert tuple(m.outputs) == ("CP",)
    assert [c.cmt for c in m.compartments] == list(range(1, len(states) + 1))
    assert m.default_dose_cmt == 1
    assert all(p.unit for p in m.parameters.values())
    assert m.time_unit == "h" and m.amount_unit == "mg"
    lin = m.linear
    assert lin is not None
    assert lin.blocks == blocks
    assert lin.closed_form
    assert lin.c == sp.zeros(len(states), 1)


@pytest.mark.parametrize("path", sorted(MODELS_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_model_file_loads(path: Path) -> None:
    m = load_model(path)
    assert m.name == path.stem
    assert set(m.odes) == set(m.states)


def test_shipped_outputs_and_iiv() -> None:
    m = load_model("pk_2cmt_oral")
    assert m.outputs["CP"].expr == sym("CENTRAL") / sym("V2")
    assert m.outputs["CP"].unit == "mg/L"
    assert {k: p.cv_percent for k, p in m.parameters.items() if p.omega2 > 0} == pytest.approx(
        {"CL": 30.0, "V2": 25.0, "KA": 40.0})
    assert m.dosing == {}


def test_nmtests_model_dosing_and_covariates() -> None:
    m = load_model("nmtests_1001")
    assert m.dosing == {"ALAG2": sym("LAGT"), "F2": sym("BIOAV"), "R2": sym("RAT2"),
                        "D2": sym("DUR2")}
    assert m.modeled_rate_cmts == {2} and m.modeled_duration_cmts == {2}
    assert m.covariates["BIOAV"].default == 1.0
    assert m.outputs["CP"].unit == "ng/mL"
    assert all(p.fixed and p.omega2 == 0 for p in m.parameters.values())


def test_unknown_model_name_lists_shipped_models() -> None:
    shipped = sorted(p.stem for p in MODELS_DIR.glob("*.toml"))
    assert {"pk_1cmt_iv", "pk_2cmt_oral", "nmtests_1001"} <= set(shipped)
    with pytest.raises(ModelError) as err:
        load_model("no_such_model")
    assert str(err.value) == (
        f"no_such_model: no such model file (models shipped: {', '.join(shipped)})")


def test_load_by_path_and_name_with_suffix(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(BASE)
    assert load_model(f).path == str(f)
    assert load_model(tmp_path / "mine").path == str(f)
    assert load_model("pk_1cmt_iv.toml").name == "pk_1cmt_iv"


# ------------------------------------------------------------------ README example
def readme_example() -> str:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "models/README.md has no toml example"
    return blocks[0]


def test_readme_example_parses() -> None:
    m = parse_model(readme_example(), "README.md")
    assert m.states == ("DEPOT", "CENTRAL")
    assert m.default_dose_cmt == 1
    assert set(m.dosing) == {"ALAG1", "F1"}
    assert m.individual["CL"] == sym("CL") * (sym("WT") / 70) ** sp.Float(0.75)
    assert m.parameters["V"].omega2 == 0.0625
    assert m.parameters["CL"].omega2 == pytest.approx(math.log(1.09), rel=1e-14)
    assert m.covariates["WT"].default == 70.0
    assert same(m.odes["CENTRAL"], sym("KA") * sym("DEPOT") - sym("CL") / sym("V") * sym("CENTRAL"))
    assert m.linear is not None and m.linear.blocks == ((0,), (1,))


def test_readme_lists_every_shipped_model() -> None:
    text = README.read_text()
    for p in MODELS_DIR.glob("*.toml"):
        assert f"`{p.stem}`" in text, p.stem


# ------------------------------------------------------------------ linear detection
def one_cmt(ode: str, extra: str = "") -> Model:
    text = edit('CENTRAL = "KA*DEPOT - CL/V*CENTRAL"', f'CENTRAL = "{ode}"')
    return parse_model(edit("[compartments]", f"{extra}\n[compartments]", text))


def test_michaelis_menten_is_not_linear() -> None:
    mm = ('[parameters.VMAX]\nvalue = 10.0\nunit = "mg/h"\n'
          '[parameters.KM]\nvalue = 2.0\nunit = "mg/L"')
    m = one_cmt("KA*DEPOT - VMAX*(CENTRAL/V)/(KM + CENTRAL/V)", mm)
    assert m.linear is None


@pytest.mark.parametrize("ode", [
    "KA*DEPOT - CL/V*CENTRAL*(1 + 0.1*t)",        # time-varying elimination
    "KA*DEPOT - CL/V*CENTRAL + 2*Heaviside(t - 1)",  # time-varying input
])
def test_time_in_an_ode_is_not_linear(ode: str) -> None:
    m = one_cmt(ode)
    assert TIME in m.odes["CENTRAL"].free_symbols
    assert m.linear is None


def test_constant_input_is_linear() -> None:
    m = one_cmt("KA*DEPOT - CL/V*CENTRAL + 3*CL")
    lin = m.linear
    assert lin is not None
    assert lin.c == sp.Matrix([0, 3 * sym("CL")])
    assert lin.A == sp.Matrix([[-sym("KA"), 0], [sym("KA"), -sym("CL") / sym("V")]])


def test_four_state_block_is_not_closed_form() -> None:
    text = """\
[model]
name = "mammillary4"
[parameters]
K = { value = 1.0, unit = "1/h" }
[compartments]
C = { cmt = 1 }
P1 = { cmt = 2 }
P2 = { cmt = 3 }
P3 = { cmt = 4 }
[odes]
C = "-4*K*C + K*(P1 + P2 + P3)"
P1 = "K*(C - P1)"
P2 = "K*(C - P2)"
P3 = "K*(C - P3)"
[outputs]
CP = "C"
"""
    lin = parse_model(text).linear
    assert lin is not None
    assert lin.blocks == ((0, 1, 2, 3),)
    assert not lin.closed_form


def test_transit_chain_blocks_in_dependency_order() -> None:
    text = """\
[model]
name = "transit"
[parameters]
KTR = { value = 1.0, unit = "1/h" }
[compartments]
OUT = { cmt = 3 }
T2 = { cmt = 2 }
T1 = { cmt = 1, dose = true }
[odes]
T1 = "-KTR*T1"
T2 = "KTR*(T1 - T2)"
OUT = "KTR*T2"
[outputs]
Y = "OUT"
"""
    m = parse_model(text)
    assert m.linear is not None
    assert m.linear.blocks == ((2,), (1,), (0,))
    assert m.default_dose_cmt == 1
    assert m.cmt_numbers == {3: 0, 2: 1, 1: 2}


# ------------------------------------------------------------------ values, derived, syntax
def test_with_values_replaces_a_typical_value() -> None:
    m = load_model("pk_1cmt_oral")
    m2 = m.with_values(CL=7, KA=2.5)
    assert m2.theta == {"CL": 7.0, "V": 50.0, "KA": 2.5}
    assert m2.parameters["CL"].omega2 == m.parameters["CL"].omega2
    assert m2.parameters["CL"].description == m.parameters["CL"].description
    assert m.theta["CL"] == 5.0  # the original is unchanged


def test_with_values_rejects_unknown_names() -> None:
    m = load_model("pk_1cmt_oral")
    with pytest.raises(ModelError) as err:
        m.with_values(CLX=1.0)
    assert str(err.value) == f"{m.path}: unknown parameter 'CLX' (model has CL, V, KA)"


def test_iiv_cv_is_converted_to_omega2() -> None:
    p = parse_model(BASE).parameters
    assert p["CL"].omega2 == pytest.approx(math.log(1.09), rel=1e-14)
    assert p["CL"].cv_percent == pytest.approx(30.0)
    assert p["V"].omega2 == 0.0


def test_derived_statements_are_substituted() -> None:
    text = with_section('[derived]\nKE = "CL/V"\nHALF = "log(2)/KE"\nBIO = "0.5"')
    text = edit('CENTRAL = "KA*DEPOT - CL/V*CENTRAL"', 'CENTRAL = "KA*DEPOT - KE*CENTRAL"',
                text)
    text = edit('DEPOT   = { cmt = 1, unit = "mg" }',
                'DEPOT   = { cmt = 1, unit = "mg", init = "10*BIO" }', text)
    text = edit('unit = "mg/L" }', 'unit = "mg/L" }\nTHALF = "HALF"\n[dosing]\nF1 = "BIO"', text)
    m = parse_model(text)
    cl, v = sym("CL"), sym("V")
    assert m.odes["CENTRAL"] == sym("KA") * sym("DEPOT") - cl / v * sym("CENTRAL")
    assert same(m.outputs["THALF"].expr, sp.log(2) * v / cl)
    assert m.dosing["F1"] == sp.Float(0.5)
    assert m.compartments[0].init == sp.Float(5)
    names = {"KE", "HALF", "BIO"}
    for e in [*m.odes.values(), *m.dosing.values(), *(o.expr for o in m.outputs.values())]:
        assert not {str(s) for s in e.free_symbols} & names


def test_nonmem_style_functions_and_caret() -> None:
    text = with_section('[covariates]\nWT = { unit = "kg", default = 70 }\n'
                        '[individual]\nCL = "CL*(WT/70)^0.75"\nV = "V*EXP(0.01*(WT - 70))"')
    text = edit('CENTRAL = "KA*DEPOT - CL/V*CENTRAL"',
                'CENTRAL = "KA*DEPOT - EXP(LOG(CL) - LOG(V))*CENTRAL"', text)
    text = edit('CP = { expr = "CENTRAL/V"', 'CP = { expr = "SQRT(CENTRAL^2)/V"', text)
    m = parse_model(text)
    cl, v, wt, central = sym("CL"), sym("V"), sym("WT"), sym("CENTRAL")
    assert m.individual["CL"] == cl * (wt / 70) ** sp.Float(0.75)
    assert m.individual["V"] == v * sp.exp(sp.Float(0.01) * (wt - 70))
    assert same(m.odes["CENTRAL"], sym("KA") * sym("DEPOT") - cl / v * central)
    assert m.outputs["CP"].expr == sp.Abs(central) / v
    assert m.linear is not None


def test_piecewise_max_min_parse() -> None:
    m = one_cmt("KA*DEPOT - Max(CL, 1)/V*CENTRAL + Piecewise((1, t < 2), (0, True))")
    assert m.odes["CENTRAL"].has(sp.Max, sp.Piecewise)
    assert m.linear is None  # t in the input


def test_parse_model_in_memory_path() -> None:
    with pytest.raises(ModelError) as err:
        parse_model(edit("[outputs]", "[output]"))
    assert str(err.value).startswith("<memory>, line 17, [output]: unknown section")


# ------------------------------------------------------------------ malformed files
SECTIONS = "model, parameters, covariates, individual, compartments, derived, odes, dosing, outputs"
PARAM_FIELDS = ("assumption, description, fixed, iiv_cv, lower, omega2, source, unit, upper, "
                "value")

# (id, malformed text, message after "<path>")
MALFORMED = [
    ("toml-syntax",
     edit('V  = { value = 50.0, unit = "L" }', 'V  = { value = 50.0, unit = "L" '),
     ": not valid TOML: Unclosed inline table (at line 6, column 33)"),
    ("unknown-section", edit("[outputs]", "[output]"),
     f", line 17, [output]: unknown section (expected one of {SECTIONS})"),
    ("missing-odes",
     edit('[odes]\nDEPOT   = "-KA*DEPOT"\nCENTRAL = "KA*DEPOT - CL/V*CENTRAL"\n', ""),
     ": missing section [odes]"),
    ("missing-name", edit('name = "m"', 'description = "m"'),
     ", [model] name: expected a string name"),
    ("parameter-without-value", edit('V  = { value = 50.0, unit = "L" }', 'V  = { unit = "L" }'),
     ", line 6, [parameters] V: value must be a finite number, got None"),
    ("parameter-value-not-a-number",
     edit('V  = { value = 50.0, unit = "L" }', 'V  = { value = "50", unit = "L" }'),
     ", line 6, [parameters] V: value must be a finite number, got '50'"),
    ("parameter-without-unit", edit('V  = { value = 50.0, unit = "L" }', "V  = { value = 50.0 }"),
     ', line 6, [parameters] V: unit is required (use "-" for dimensionless)'),
    ("parameter-bare-number", edit('V  = { value = 50.0, unit = "L" }', "V  = 50.0"),
     ", line 6, [parameters] V: expected a table { value = ..., unit = ... }"),
    ("negative-omega2",
     edit('V  = { value = 50.0, unit = "L" }', 'V  = { value = 50.0, unit = "L", omega2 = -0.1 }'),
     ", line 6, [parameters] V: omega2 must be a variance >= 0, got -0.1"),
    ("negative-iiv-cv",
     edit('V  = { value = 50.0, unit = "L" }', 'V  = { value = 50.0, unit = "L", iiv_cv = -5 }'),
     ", line 6, [parameters] V: iiv_cv must be a percentage >= 0, got -5"),
    ("omega2-and-iiv-cv",
     edit("iiv_cv = 30 }", "iiv_cv = 30, omega2 = 0.09 }"),
     ", line 5, [parameters] CL: give omega2 or iiv_cv, not both"),
    ("unknown-parameter-field",
     edit('V  = { value = 50.0, unit = "L" }', 'V  = { value = 50.0, units = "L" }'),
     f", line 6, [parameters] V: unknown field 'units' (expected {PARAM_FIELDS})"),
    ("value-outside-bounds",
     edit('KA = { value = 1.0, unit = "1/h" }',
          'KA = { value = 1.0, unit = "1/h", lower = 2, upper = 5 }'),
     ", line 7, [parameters] KA: value 1.0 outside [lower, upper] = [2, 5]"),
    ("unknown-symbol-in-ode",
     edit('CENTRAL = "KA*DEPOT - CL/V*CENTRAL"', 'CENTRAL = "KA*DEPOT - K10*CENTRAL"'),
     ", line 15, [odes] CENTRAL: unknown symbol 'K10' in 'KA*DEPOT - K10*CENTRAL' "
     "(allowed here: states, parameters, covariates, derived, outputs, t)"),
    ("ode-for-undeclared-compartment",
     edit('CENTRAL = "KA*DEPOT - CL/V*CENTRAL"\n',
          'CENTRAL = "KA*DEPOT - CL/V*CENTRAL"\nPERIPH  = "0"\n'),
     ", line 16, [odes] PERIPH: no such compartment (declare it in [compartments])"),
    ("compartment-without-ode", edit('DEPOT   = "-KA*DEPOT"\n', ""),
     ", line 10, [compartments] DEPOT: has no equation in [odes]"),
    ("duplicate-name",
     edit('CENTRAL = { cmt = 2, unit = "mg" }',
          'CENTRAL = { cmt = 2, unit = "mg" }\nV = { cmt = 3 }'),
     ", line 12, [compartments] V: name already declared in [parameters]"),
    ("output-named-like-parameter", edit('CP = { expr = "CENTRAL/V"', 'CL = { expr = "CENTRAL/V"'),
     ", line 18, [outputs] CL: name already declared in [parameters]"),
    ("bad-dosing-key", with_section('[dosing]\nFOO2 = "1"'),
     ", line 18, [dosing] FOO2: expected ALAGn, Fn, Rn or Dn with n a CMT number"),
    ("dosing-key-for-missing-cmt", with_section('[dosing]\nALAG9 = "0.5"'),
     ", line 18, [dosing] ALAG9: no compartment has cmt 9"),
    ("state-in-dosing", with_section('[dosing]\nF1 = "CENTRAL/100"'),
     ", line 18, [dosing] F1: unknown symbol 'CENTRAL' in 'CENTRAL/100' "
     "(allowed here: parameters, covariates, derived)"),
    ("unparseable-equation",
     edit('CENTRAL = "KA*DEPOT - CL/V*CENTRAL"', 'CENTRAL = "KA*DEPOT - CL/V*"'),
     ", line 15, [odes] CENTRAL: cannot parse 'KA*DEPOT - CL/V*' "
     "(SyntaxError: invalid syntax (<string>, line 1))"),
    ("equation-not-a-string", edit('DEPOT   = "-KA*DEPOT"', 'DEPOT   = ["-KA*DEPOT"]'),
     ", line 14, [odes] DEPOT: expected an equation as a string, got ['-KA*DEPOT']"),
    ("relation-not-expression", edit('expr = "CENTRAL/V"', 'expr = "CENTRAL > V"'),
     ", line 18, [outputs] CP: 'CENTRAL > V' is not an expression"),
    ("not-finite", edit('expr = "CENTRAL/V"', 'expr = "CENTRAL/0"'),
     ", line 18, [outputs] CP: 'CENTRAL/0' is not a finite real expression"),
    ("output-without-expr",
     edit('CP = { expr = "CENTRAL/V", unit = "mg/L" }', 'CP = { unit = "mg/L" }'),
     ", line 18, [outputs] CP: expected a table with expr (and unit)"),
    ("reserved-name-t", edit("KA = { value", "t = { value"),
     ", line 7, [parameters] t: 't' is reserved (time or a function)"),
    ("reserved-name-exp", edit("KA = { value", "exp = { value"),
     ", line 7, [parameters] exp: 'exp' is reserved (time or a function)"),
    ("invalid-name", edit("KA = { value", '"2KA" = { value'),
     ", line 7, [parameters] 2KA: names must start with a letter and hold only letters, "
     "digits and _"),
    ("duplicate-cmt-numbers",
     edit('CENTRAL = { cmt = 2, unit = "mg" }', 'CENTRAL = { cmt = 1, unit = "mg" }'),
     ", line 11, [compartments] CENTRAL: cmt 1 is used twice"),
    ("cmt-not-positive",
     edit('CENTRAL = { cmt = 2, unit = "mg" }', 'CENTRAL = { cmt = 0, unit = "mg" }'),
     ", line 11, [compartments] CENTRAL: cmt must be a positive integer, got 0"),
    ("unknown-compartment-field",
     edit('CENTRAL = { cmt = 2, unit = "mg" }', 'CENTRAL = { cmt = 2, unit = "mg", volume = "V" }'),
     ", line 11, [compartments] CENTRAL: unknown field 'volume' (expected cmt, unit, "
     "description, init, dose)"),
    ("two-dose-compartments",
     edit('unit = "mg" }\nCENTRAL = { cmt = 2, unit = "mg" }',
          'unit = "mg", dose = true }\nCENTRAL = { cmt = 2, unit = "mg", dose = true }'),
     ", line 11, [compartments] CENTRAL: only one compartment can be the default dose "
     "compartment (dose = true)"),
    ("individual-for-non-parameter", with_section('[individual]\nKE = "CL/V"'),
     ", line 18, [individual] KE: left-hand side must be a parameter declared in [parameters]"),
    ("derived-uses-later-derived", with_section('[derived]\nK2 = "KE*2"\nKE = "CL/V"'),
     ", line 18, [derived] K2: unknown symbol 'KE' in 'KE*2' "
     "(allowed here: parameters, covariates, earlier derived)"),
    ("covariate-default-not-number", with_section('[covariates]\nWT = { default = "seventy" }'),
     ", line 18, [covariates] WT: default must be a number, got 'seventy'"),
]


def test_enough_malformed_cases() -> None:
    assert len(MALFORMED) >= 14
    assert len({case[0] for case in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_model_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad_model.toml"
    path.write_text(text)
    with pytest.raises(ModelError) as err:
        load_model(path)
    assert str(err.value) == f"{path}{message}"


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in MALFORMED[:4]],
                         ids=[c[0] for c in MALFORMED[:4]])
def test_malformed_text_names_memory(text: str, message: str) -> None:
    with pytest.raises(ModelError) as err:
        parse_model(text)
    assert str(err.value) == f"<memory>{message}"


def test_directory_is_not_a_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        load_model(tmp_path)  # a directory: resolves to nothing
    shipped = ", ".join(sorted(p.stem for p in MODELS_DIR.glob("*.toml")))
    assert str(err.value) == f"{tmp_path}: no such model file (models shipped: {shipped})"


# ------------------------------------------------------------------ parser hardening
def test_unknown_name_gets_unknown_symbol_message() -> None:
    with pytest.raises(ModelError, match=r"unknown symbol 'K10'"):
        parse_model(edit('CL/V*CENTRAL"', 'K10*CENTRAL"'))


def test_undeclared_e_is_rejected() -> None:
    with pytest.raises(ModelError):
        parse_model(edit('CL/V*CENTRAL"', 'E*CENTRAL"'))


def test_time_rejected_outside_odes_and_outputs() -> None:
    with pytest.raises(ModelError):
        parse_model(with_section('[dosing]\nALAG1 = "0.1*t"'))


def test_nan_omega2_rejected() -> None:
    with pytest.raises(ModelError):
        parse_model(edit("iiv_cv = 30 }", "omega2 = nan }"))


def test_python_code_in_an_equation_is_rejected() -> None:
    with pytest.raises(ModelError, match="only names, numbers, operators and function calls"):
        parse_model(edit('CL/V*CENTRAL"', "CL/V*CENTRAL + 0*len(__import__('os').listdir('/'))\""))


def test_explicit_missing_path_does_not_fall_back_to_shipped_models(tmp_path) -> None:
    missing = tmp_path / "pk_1cmt_iv.toml"
    with pytest.raises(ModelError, match="no such model file"):
        load_model(missing)


# ------------------------------------------------------------------ composition (uses)
PD_ON_PK = """
[model]
name = "emax_on_pk"
uses = ["pk_1cmt_oral"]

[parameters]
EC50 = { value = 0.5, unit = "mg/L" }
KE0  = { value = 0.2, unit = "1/h" }

[compartments]
CE = { cmt = 3, unit = "mg/L", description = "effect site" }

[odes]
CE = "KE0*(CP - CE)"

[outputs]
EFF = { expr = "CE/(EC50 + CE)", unit = "-" }
"""


def test_uses_merges_the_pk_model_and_its_outputs() -> None:
    m = parse_model(PD_ON_PK, "emax.toml")
    assert m.states == ("DEPOT", "CENTRAL", "CE")
    assert set(m.parameters) == {"CL", "V", "KA", "EC50", "KE0"}
    assert set(m.outputs) == {"CP", "EFF"}
    # CP in the effect-site ODE is replaced by the PK model's CENTRAL/V
    assert str(m.odes["CE"]) == str(parse_model(PD_ON_PK.replace("CP - CE", "CENTRAL/V - CE"),
                                                "x.toml").odes["CE"])
    assert m.linear is not None  # effect compartment on linear PK stays linear


def test_uses_rejects_a_name_clash() -> None:
    text = PD_ON_PK.replace('KE0  = { value = 0.2, unit = "1/h" }',
                            'KE0  = { value = 0.2, unit = "1/h" }\n'
                            'KA = { value = 1, unit = "1/h" }')
    with pytest.raises(ModelError) as err:
        parse_model(text, "emax.toml")
    assert str(err.value) == ("emax.toml, line 9, [parameters] KA: already defined by the used "
                              "model 'pk_1cmt_oral'")


def test_outputs_can_be_used_in_odes_and_later_outputs() -> None:
    text = PD_ON_PK.replace('EFF = { expr = "CE/(EC50 + CE)", unit = "-" }',
                            'EFF = { expr = "CE/(EC50 + CE)", unit = "-" }\n'
                            'PCT = { expr = "100*EFF", unit = "%" }')
    m = parse_model(text, "x.toml")
    ce = sp.Symbol("CE", real=True)
    ec50 = sp.Symbol("EC50", real=True)
    assert sp.simplify(m.outputs["PCT"].expr - 100 * ce / (ec50 + ce)) == 0


def test_uses_merges_a_shared_base_once(tmp_path) -> None:
    """Two PD models on the same PK model can be used together (diamond)."""
    b = """
[model]
name = "inh_on_pk"
uses = ["pk_1cmt_oral"]
[parameters]
IC50 = { value = 1.0, unit = "mg/L" }
KE1  = { value = 0.1, unit = "1/h" }
[compartments]
CE2 = { cmt = 4, unit = "mg/L" }
[odes]
CE2 = "KE1*(CP - CE2)"
[outputs]
INH = { expr = "CE2/(IC50 + CE2)", unit = "-" }
"""
    (tmp_path / "a.toml").write_text(PD_ON_PK)
    (tmp_path / "b.toml").write_text(b)
    both = f"""
[model]
name = "both"
uses = ["{tmp_path / 'a.toml'}", "{tmp_path / 'b.toml'}"]
[parameters]
[compartments]
[odes]
[outputs]
"""
    m = parse_model(both, "both.toml")
    assert m.states == ("DEPOT", "CENTRAL", "CE", "CE2")
    assert {"CP", "EFF", "INH"} <= set(m.outputs)
    clash = b.replace("IC50", "EC50")
    (tmp_path / "b.toml").write_text(clash)
    with pytest.raises(ModelError, match="EC50: defined by both used models 'emax_on_pk' and "
                                         "'inh_on_pk'"):
        parse_model(both, "both.toml")


def test_a_derived_statement_replaces_a_used_models_parameter() -> None:
    """A reparameterisation: KE = CL/V of the PK model written through a half-life."""
    text = """
[model]
name = "pk_thalf"
uses = ["pk_1cmt_oral"]
[parameters]
THALF = { value = 6.93147, unit = "h" }
[derived]
CL = "log(2)*V/THALF"
"""
    m = parse_model(text, "thalf.toml")
    assert "CL" not in m.parameters and "THALF" in m.parameters
    base = load_model("pk_1cmt_oral")
    ke = base.odes["CENTRAL"].coeff(sp.Symbol("CENTRAL", real=True))
    ke_new = m.odes["CENTRAL"].coeff(sp.Symbol("CENTRAL", real=True))
    v, th = sp.Symbol("V", real=True), sp.Symbol("THALF", real=True)
    assert sp.simplify(ke_new + sp.log(2) / th) == 0
    assert ke == -sp.Symbol("CL", real=True) / v


def test_smm_mspike_net_is_smm_mspike_with_kkill_from_the_net_rate() -> None:
    """Same trajectories as smm_mspike at KKILL = (KNET + KG)/IREF (100 mg QW, 1 year)."""
    import numpy as np

    from pkpd.simulation import simulate_regimen

    net, base = load_model("smm_mspike_net"), load_model("smm_mspike")
    assert set(base.parameters) - set(net.parameters) == {"KKILL"}
    p = {k: v.value for k, v in net.parameters.items()}
    kkill = (p["KNET"] + p["KG"]) / p["IREF"]
    assert kkill == pytest.approx(base.parameters["KKILL"].value, rel=1e-3)
    t = np.arange(0.0, 8760.0, 168.0)
    a = simulate_regimen(net, "100 mg QW", t)
    b = simulate_regimen(base, "100 mg QW", t, params={"KKILL": kkill})
    for out in ("MSPIKE", "TUMOR", "CP"):
        np.testing.assert_allclose(np.asarray(a[out]), np.asarray(b[out]), rtol=1e-9)
    assert float(np.asarray(a["MSPIKE"]).ravel()[-1]) < 0.7 * 2.0  # it does respond
