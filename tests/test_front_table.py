"""The search's and `autoprec front`'s table: one column per format a member uses (fp8 only where some member has it)."""

import pandas as pd

from autoprec.cli import _front_table


def _front(fp8_layers: list[int]) -> pd.DataFrame:
    rows = []
    for trial, fp8 in enumerate(fp8_layers):
        rows.append(dict(trial=trial, score=1.0 - 0.001 * trial, score_drop=0.001 * trial, latency_ms=10.0 - trial,
                         latency_ratio=1.0 - 0.1 * trial, retimed_ratio=float("nan"), memory_bytes=1000 - 100 * trial,
                         memory_ratio=1.0 - 0.1 * trial, default="bf16", fp32=4 - fp8, fp16=0, bf16=0, int8=0,
                         fp8=fp8, origin="sampler"))
    return pd.DataFrame(rows)


def _header(table: str) -> list[str]:
    return table.splitlines()[0].split()


def test_fp8_column_appears_only_where_a_member_uses_fp8():
    without = _front([0, 0])
    assert "fp8" not in _header(_front_table(without))
    with_fp8 = _front([0, 3])
    table = _front_table(with_fp8)
    header = _header(table)
    assert header[header.index("int8") + 1] == "fp8"
    lines = table.splitlines()
    at = lines[0].index(" fp8 ") + 1
    row_of_trial_1 = next(line for line in lines[2:] if line.split()[0] == "1")
    assert row_of_trial_1[at:at + 3].strip() == "3"


def test_a_policy_measured_twice_is_one_point_on_the_front():
    """A sampler's repeat of a measured policy gets its twin's values (not measured again): the front lists
    it once, under the first trial's number; a different point stays."""
    from autoprec.results.frames import pareto_front

    rows = [dict(trial=3, feasible=True, score=0.99, score_drop=0.01, latency_ms=5.0, memory_bytes=100),
            dict(trial=8, feasible=True, score=0.99, score_drop=0.01, latency_ms=5.0, memory_bytes=100),
            dict(trial=9, feasible=True, score=1.0, score_drop=0.0, latency_ms=9.0, memory_bytes=400)]
    front = pareto_front(pd.DataFrame(rows))
    assert list(front.trial) == [3, 9]
