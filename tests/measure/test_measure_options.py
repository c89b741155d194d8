"""MeasureOptions (one home for measure's defaults, the CLI's included) and WritePolicy (its table)."""

import dataclasses

import pytest

from poelm.cli import build_parser
from poelm.cli.measure import measure_options
from poelm.core.errors import PoelmError
from poelm.measure.options import MeasureOptions, WritePolicy


def test_cli_defaults_are_the_dataclass():
    args = build_parser().parse_args(["measure", "ckpt"])
    assert measure_options(args) == MeasureOptions()
    args = build_parser().parse_args(["measure", "ckpt", "--probe", "none", "--timing-rounds", "5", "--quiet", "--cap", "0.05"])
    assert measure_options(args) == MeasureOptions(probe_set=None, timing_repeats=5, progress=False, cap=0.05)


def test_every_field_without_a_flag_is_documented_as_such():
    # a field the CLI does not set keeps the dataclass default; these are the only ones
    args = vars(build_parser().parse_args(["measure", "ckpt"]))
    assert {f.name for f in dataclasses.fields(MeasureOptions)} - set(args) == {"level", "dtype", "progress", "gen_context"}


def test_of_and_checked():
    o = MeasureOptions.of(None, cap=0.1, routing_metric="target_regression")
    assert (o.cap, o.split_tokens) == (0.1, 1_048_576)
    assert o.checked(96).routing_metric == "target"  # the old name, canonical
    with pytest.raises(TypeError, match="unknown measure option.*split"):
        MeasureOptions.of(None, split=3)
    with pytest.raises(PoelmError, match="routing metric"):
        o.replace(routing_metric="x").checked(96)
    with pytest.raises(PoelmError, match="split_tokens must be positive"):
        o.replace(split_tokens=0).checked(96)
    with pytest.raises(PoelmError, match="at most 93"):
        o.replace(gen_tokens=94).checked(96)
    assert MeasureOptions().probe_for({}) == "card"
    assert MeasureOptions().probe_for({"config": {"data": {"path": "embedded"}}}) == "embedded"
    assert MeasureOptions(probe_set=None).probe_for({"config": {"data": {"path": "embedded"}}}) is None


# (out, write, data, write_branch) -> (into, write_calibration, data_override) or the error; the docstring's table
TABLE = [
    ((None, True, None, False), (True, True, False)),
    (("f.json", True, None, False), (False, False, False)),
    ((None, False, None, False), (False, False, False)),
    (("f.json", False, "c.txt", False), (False, False, False)),
    ((None, True, "c.txt", False), "not written into T unless asked"),
    (("f.json", True, "c.txt", False), (False, False, False)),
    ((None, True, "c.txt", True), (True, False, True)),
    (("f.json", True, None, True), (True, True, False)),
    ((None, False, None, True), "contradict"),
]


@pytest.mark.parametrize("flags, want", TABLE)
def test_write_policy_table(flags, want):
    out, write, data, write_branch = flags
    if isinstance(want, str):
        with pytest.raises(PoelmError, match=want):
            WritePolicy.of("T", out=out, write=write, data=data, write_branch=write_branch)
        return
    p = WritePolicy.of("T", out=out, write=write, data=data, write_branch=write_branch)
    assert (p.into, p.write_calibration, p.data_override, p.out) == (*want, out)
    # an explicit write_calibration wins over the default
    assert WritePolicy.of("T", out=out, write=write, data=data, write_branch=write_branch, write_calibration=True).write_calibration
