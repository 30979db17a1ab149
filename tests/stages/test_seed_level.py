"""Training-seed error bars by hand: the mean over seeds of each curve's interpolated reward, its
standard error the seeds' spread, and A − B with both methods' errors."""

import math

import pytest

from warp_rlhf.stages.compare import Point
from warp_rlhf.stages.seed_level import grid, mean_curve, seed_level, shared_range


def line(slope: float, end: float = 4.0) -> list[Point]:
    """reward = slope · KL from the SFT point (0, 0) to KL `end`."""
    return [Point(0.0, 0.0), Point(end / 2, slope * end / 2), Point(end, slope * end)]


def test_a_mean_curve_is_the_seeds_mean_with_their_standard_error():
    curve = mean_curve("m", [line(1.0), line(2.0), line(3.0)], [1.0, 3.0])
    assert curve.mean == pytest.approx([2.0, 6.0])  # slopes 1, 2, 3 at KL 1 and 3
    assert curve.se == pytest.approx([1.0 / math.sqrt(3), 3.0 / math.sqrt(3)])  # std of (1, 2, 3)·k is k
    assert curve.seeds == 3


def test_seed_level_compares_on_the_range_every_seed_covers():
    methods = {"a": ("A", [line(2.0, 4.0), line(2.0, 6.0)]), "b": ("B", [line(1.0, 3.0), line(1.0, 5.0)])}
    assert shared_range([c for _, cs in methods.values() for c in cs]) == (0.0, 3.0)
    result = seed_level(methods, [("a_vs_b", "a", "b")])
    (claim,) = result["claims"]
    assert [d["kl"] for d in claim["differences"]] == pytest.approx([0.75, 1.5, 2.25])
    assert [d["difference"] for d in claim["differences"]] == pytest.approx([0.75, 1.5, 2.25])  # (2 − 1) · k
    assert all(d["se"] == 0 and d["z"] == math.inf for d in claim["differences"]) and claim["verdict"] == "holds"
    assert result["curves"]["a"]["kls"] == pytest.approx(grid(0.0, 3.0))


def test_seeds_that_disagree_make_a_claim_inconclusive():
    methods = {"a": ("A", [line(3.0), line(0.0)]), "b": ("B", [line(1.0), line(1.2)])}
    (claim,) = seed_level(methods, [("a_vs_b", "a", "b")])["claims"]
    # A's mean slope 1.5 is above B's 1.1, but its two seeds differ by 3: s.e. of A alone 1.5·k
    assert all(0 < d["z"] < 2 for d in claim["differences"]) and claim["verdict"] == "inconclusive"


def test_curves_without_a_shared_range_are_refused():
    with pytest.raises(ValueError, match="share no KL range"):
        shared_range([[Point(0.0, 0.0), Point(1.0, 1.0)], [Point(2.0, 0.0), Point(3.0, 1.0)]])
