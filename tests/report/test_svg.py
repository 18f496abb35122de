"""The charts: downsampling keeps every pixel column's min and max; a 100k-step curve is cut
to what a chart can show; ticks are round; text is escaped."""

import doctest
import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import stoker.report.svg
from stoker.report.svg import Marker, Series, downsample, line_chart, nice_ticks


def _check_buckets(xs, ys, buckets, kx, ky):
    """Every bucket's min and max of ``ys`` is among the kept points, in the original order."""
    span = xs[-1] - xs[0]
    b = np.minimum(((xs - xs[0]) * (buckets / span)).astype(int), buckets - 1)
    for bucket in np.unique(b):
        inside = b == bucket
        kept = ky[np.isin(kx, xs[inside])]
        assert ys[inside].min() in kept and ys[inside].max() in kept
    assert len(kx) <= 2 * buckets
    assert np.all(np.diff(kx) >= 0)  # still in x order: draws as a line


def test_a_one_step_spike_in_100k_steps_survives():
    rng = np.random.default_rng(0)
    xs = np.arange(1, 100_001, dtype=float)
    ys = 3.0 * np.exp(-xs / 20_000) + 0.01 * rng.standard_normal(len(xs))
    ys[54_321] = 50.0  # one bad batch
    ys[77_777] = -5.0
    kx, ky = downsample(xs, ys, 480)
    assert len(kx) <= 960
    assert 50.0 in ky and kx[ky == 50.0][0] == 54_322
    assert -5.0 in ky
    _check_buckets(xs, ys, 480, kx, ky)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=400),
    st.integers(1, 40),
    st.integers(0, 2**31),
)
def test_every_bucket_keeps_its_min_and_max(values, buckets, seed):
    ys = np.asarray(values)
    # x non-decreasing with repeats and uneven gaps, as steps and wall-clock times are.
    gaps = np.random.default_rng(seed).integers(0, 3, len(ys)).astype(float)
    xs = np.cumsum(gaps)
    kx, ky = downsample(xs, ys, buckets)
    if len(xs) <= 2 * buckets:
        assert np.array_equal(kx, xs) and np.array_equal(ky, ys)
    elif xs[-1] > xs[0]:
        _check_buckets(xs, ys, buckets, kx, ky)
    else:
        assert set(ky) == {ys.min(), ys.max()}


def test_a_100k_step_chart_draws_at_most_two_points_per_pixel_column():
    xs = np.arange(100_000, dtype=float)
    ys = np.sin(xs / 500)
    svg = line_chart([Series("loss", xs, ys)], title="loss", x_label="step")
    d = re.search(r'class="curve" d="([^"]+)"', svg).group(1)
    points = d.count("L") + d.count("M")
    assert 100 < points <= 2 * 540
    assert len(svg) < 40_000


def test_segments_markers_and_non_finite_values():
    xs = np.array([1, 2, 3, 4, 5, 3, 4, 5, 6], dtype=float)  # resumed at step 3
    ys = np.array([5, 4, np.nan, 3, 2, 3.5, 3, 2, 1], dtype=float)
    svg = line_chart(
        [Series("loss", xs, ys, breaks=[5])],
        title="t",
        x_label="step",
        markers=[Marker(3, "resume", "resumed from step 3"), Marker(5, "checkpoint", "ckpt")],
    )
    d = re.search(r'class="curve" d="([^"]+)"', svg).group(1)
    # 8 finite points in three segments: the NaN at step 3 and the resume each start one.
    assert d.count("M") == 3 and d.count("L") == 5
    assert svg.count('class="marker resume"') == 1 and "resumed from step 3" in svg


def test_no_finite_value_is_said_not_drawn():
    svg = line_chart([Series("x", np.arange(3.0), np.full(3, np.nan))], title="t", x_label="s")
    assert "no finite values" in svg and "<path" not in svg


def test_text_is_escaped():
    bad = "</title><script>alert(1)</script>"
    svg = line_chart(
        [Series(bad, np.arange(3.0), np.arange(3.0))],
        title=bad,
        x_label=bad,
        markers=[Marker(1, bad, bad)],
    )
    assert "<script" not in svg and "&lt;script&gt;" in svg


def test_docstring_examples():
    assert doctest.testmod(stoker.report.svg, raise_on_error=False).failed == 0


def test_round_ticks():
    assert nice_ticks(0, 97) == [0, 20, 40, 60, 80]
    assert nice_ticks(0.31, 0.58) == [0.35, 0.4, 0.45, 0.5, 0.55]
    assert nice_ticks(0, 100_000, 6) == [0, 20_000, 40_000, 60_000, 80_000, 100_000]
