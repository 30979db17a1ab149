"""Training-seed error bars by hand: the mean over seeds of each curve's interpolated reward, its
standard error the seeds' spread, and A − B with both methods' errors."""

import math

import pytest

from warp_rlhf.stages.compare import Point
from warp_rlhf.stages.seed_level import grid, mean_curve, seed_level, shared_range, t_threshold


def line(slope: float, end: float = 4.0) -> list[Point]:
    """reward = slope · KL from the SFT point (0, 0) to KL `end`."""
    return [Point(0.0, 0.0), Point(end / 2, slope * end / 2), Point(end, slope * end)]


def test_a_mean_curve_is_the_seeds_mean_with_their_standard_error():
    curve = mean_curve("m", [line(1.0), line(2.0), line(3.0)], [1.0, 3.0])
    assert curve.mean == pytest.approx([2.0, 6.0])  # slopes 1, 2, 3 at KL 1 and 3
    assert curve.se == pytest.approx([1.0 / math.sqrt(3), 3.0 / math.sqrt(3)])  # std of (1, 2, 3)·k is k
    assert curve.seeds == 3


def test_seed_level_compares_paired_seeds_on_the_range_both_methods_cover():
    methods = {
        "a": ("A", [line(2.0, 4.0), line(2.2, 6.0), line(1.8, 5.0)]),
        "b": ("B", [line(1.0, 3.0), line(1.0, 5.0), line(1.0, 4.0)]),
        "c": ("C", [line(0.5, 1.0), line(0.5, 1.0), line(0.5, 1.0)]),  # a third method does not move A − B's range
    }
    result = seed_level(methods, [("a_vs_b", "a", "b")])
    (claim,) = result["claims"]
    assert [d["kl"] for d in claim["differences"]] == pytest.approx([0.75, 1.5, 2.25])  # inside [0, 3]
    # per seed A − B = (1, 1.2, 0.8) · k: mean k, s.e. 0.2 k / sqrt(3)
    assert [d["difference"] for d in claim["differences"]] == pytest.approx([0.75, 1.5, 2.25])
    assert [d["se"] for d in claim["differences"]] == pytest.approx([0.2 * k / math.sqrt(3) for k in (0.75, 1.5, 2.25)])
    assert claim["threshold"] == pytest.approx(4.303) and claim["verdict"] == "holds"  # z = 8.7 > t(2)
    assert result["curves"]["a"]["kls"] == pytest.approx(grid(0.0, 1.0))  # the figure: every method's range


def test_seeds_that_disagree_make_a_claim_inconclusive_under_the_t_threshold():
    methods = {"a": ("A", [line(3.0), line(1.6), line(2.0)]), "b": ("B", [line(1.0), line(1.2), line(1.1)])}
    (claim,) = seed_level(methods, [("a_vs_b", "a", "b")])["claims"]
    # per seed A − B = (2, 0.4, 0.9) · k: z = 1.1 / (0.82 / sqrt(3)) = 2.3, above 2 but below t(2) = 4.3
    assert all(2 < d["z"] < 4.303 for d in claim["differences"]) and claim["verdict"] == "inconclusive"


def test_the_t_threshold_needs_two_seeds_and_is_never_below_two():
    assert t_threshold(3) == pytest.approx(4.303) and t_threshold(31) == pytest.approx(2.042)
    assert t_threshold(1000) == 2.0
    with pytest.raises(ValueError, match="at least 2 seeds"):
        t_threshold(1)


def test_curves_without_a_shared_range_are_refused():
    with pytest.raises(ValueError, match="share no KL range"):
        shared_range([[Point(0.0, 0.0), Point(1.0, 1.0)], [Point(2.0, 0.0), Point(3.0, 1.0)]])
