"""Reward at matched KL, on synthetic points with known answers."""

import math
import random

import pytest

from warp_rlhf.stages.compare import Difference, Point, compare, interpolate, matched_kl_points, overlap, verdict


def line(slope: float, offset: float, kls: list[float], se: float = 0.1) -> list[Point]:
    return [Point(k, slope * k + offset, kl_se=0.0, reward_se=se) for k in kls]


def test_interpolation_and_its_error_by_hand():
    curve = [Point(2.0, 1.0, kl_se=0.2, reward_se=0.2), Point(0.0, 0.0, kl_se=0.2, reward_se=0.1)]  # unsorted
    reward, se = interpolate(curve, 0.5)  # t = 1/4, slope 1/2
    assert reward == pytest.approx(0.25)
    variance = 0.75**2 * (0.1**2 + 0.25 * 0.2**2) + 0.25**2 * (0.2**2 + 0.25 * 0.2**2)
    assert se == pytest.approx(math.sqrt(variance))
    assert interpolate(curve, 2.0)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside the curve's range"):
        interpolate(curve, 2.5)  # never extrapolated


def test_parallel_lines_differ_by_their_offset_everywhere_they_overlap():
    a, b = line(0.5, 1.0, [0, 2, 4]), line(0.5, 0.0, [0, 1, 3, 5])
    assert overlap(a, b) == (0, 4)
    assert matched_kl_points(a, b) == [1.0, 2.0, 3.0]
    for difference in compare(a, b):
        assert difference.difference == pytest.approx(1.0)
    at_points = compare(a, b, [1.0, 3.0])  # B's points, between A's: the errors combine
    assert at_points[0].se == pytest.approx(math.sqrt(0.5**2 * 0.01 * 2 + 0.01))


def test_curves_that_cross_give_differences_of_both_signs():
    a, b = line(1.0, 0.0, [0, 4]), line(0.0, 2.0, [0, 4])  # A below B until KL 2, above after
    differences = compare(a, b, [1.0, 2.0, 3.0])
    assert [round(d.difference, 6) for d in differences] == [-1.0, 0.0, 1.0]


def test_curves_without_a_shared_range_are_refused():
    with pytest.raises(ValueError, match="share no KL range"):
        compare(line(1, 0, [0, 1]), line(1, 0, [2, 3]))


def per_prompt(kl: float, reward: float, base: list[float]) -> Point:
    """A point whose per-prompt rewards are a shared prompt effect `base` plus `reward`."""
    rewards = [b + reward for b in base]
    mean = sum(rewards) / len(rewards)
    se = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1) / len(rewards))
    return Point(kl, mean, 0.0, se, kls=[kl] * len(base), rewards=rewards)


def test_the_paired_bootstrap_removes_the_prompts_shared_variance():
    """Each prompt's reward has a large shared effect; the policies differ by exactly 1 on every
    prompt. Paired, the difference's error is ~0; taken as independent, it would be large."""
    rng = random.Random(0)
    base = [rng.gauss(0, 5) for _ in range(300)]
    a = [per_prompt(k, 0.5 * k + 1, base) for k in (0.0, 2.0, 4.0)]
    b = [per_prompt(k, 0.5 * k, base) for k in (0.0, 1.0, 3.0, 5.0)]
    paired = compare(a, b, resamples=300)
    unpaired = compare(
        [Point(p.kl, p.reward, 0, p.reward_se) for p in a], [Point(p.kl, p.reward, 0, p.reward_se) for p in b]
    )
    for d, u in zip(paired, unpaired, strict=True):
        assert d.difference == pytest.approx(1.0) and u.difference == pytest.approx(1.0)
        assert d.se < 1e-6 < 0.2 < u.se


def test_bootstrap_error_matches_the_sampling_spread_of_independent_noise():
    """Independent per-prompt noise of σ = 1 on two flat curves: the difference's error is
    about σ·√(2/n) at a point, and the estimate lies within a few errors of the truth."""
    rng = random.Random(1)
    n = 400

    def noisy(kl: float, mean: float) -> Point:
        rewards = [mean + rng.gauss(0, 1) for _ in range(n)]
        return Point(kl, sum(rewards) / n, 0, 1 / math.sqrt(n), kls=[kl] * n, rewards=rewards)

    a, b = [noisy(0.0, 1.0), noisy(2.0, 1.0)], [noisy(0.0, 0.0), noisy(2.0, 0.0)]
    (difference,) = compare(a, b, [0.0], resamples=1000)
    assert difference.se == pytest.approx(math.sqrt(2 / n), rel=0.15)
    assert abs(difference.difference - 1.0) < 4 * difference.se


def test_verdicts():
    assert verdict([Difference(1, 0.5, 0.1), Difference(2, 0.3, 0.1)]) == "holds"
    assert verdict([Difference(1, 0.5, 0.1), Difference(2, -0.3, 0.1)]) == "does not hold"
    assert verdict([Difference(1, 0.1, 0.1)]) == "inconclusive"
    assert verdict([Difference(1, -0.5, 0.1)], claimed="below") == "holds"


def test_a_zero_difference_without_error_is_not_a_verdict():
    """Two identical curves (every resample gives 0): z is 0, so the claim is inconclusive, not held."""
    same = [Difference(1.0, 0.0, 0.0), Difference(2.0, 0.0, 0.0)]
    assert [d.z for d in same] == [0.0, 0.0] and verdict(same) == "inconclusive"
