"""SLERP, LERP, EMA and LITI against hand computation and the paper's lemmas."""

import math

import pytest
import torch

from tests.helpers import hand_slerp
from warp_rlhf.algorithm.merge import (
    copy_into,
    ema_update_,
    liti,
    merge_task_vectors,
    model_state,
    slerp,
    slerp_task_vectors,
)


def test_slerp_of_orthogonal_unit_vectors_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = slerp(e1, e2, 0.5)
    assert torch.allclose(half, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-7)
    third = slerp(e1, e2, 1 / 3)  # Ω = π/2: coefficients cos(π/6), sin(π/6)
    assert torch.allclose(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-7)


@pytest.mark.parametrize("lam", [0.1, 0.3, 0.5, 0.9])
def test_slerp_matches_independent_computation_on_random_tensors(lam):
    g = torch.Generator().manual_seed(1)
    d1, d2 = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert torch.allclose(slerp(d1, d2, lam), hand_slerp(d1, d2, lam), atol=1e-5)


def test_slerp_endpoints_give_each_task_vector():
    g = torch.Generator().manual_seed(2)
    d1, d2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert torch.allclose(slerp(d1, d2, 0.0), d1, atol=1e-6)
    assert torch.allclose(slerp(d1, d2, 1.0), d2, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_lemma_slerp_keeps_the_norm_of_equal_norm_vectors(seed):
    g = torch.Generator().manual_seed(seed)
    d1, d2 = torch.randn(300, generator=g), torch.randn(300, generator=g)
    d2 = d2 * d1.norm() / d2.norm()
    for lam in (0.2, 0.5, 0.8):
        assert math.isclose(slerp(d1, d2, lam).norm().item(), d1.norm().item(), rel_tol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_lemma_lerp_shrinks_the_norm(seed):
    g = torch.Generator().manual_seed(seed)
    d1, d2 = torch.randn(300, generator=g), torch.randn(300, generator=g)
    d2 = d2 * d1.norm() / d2.norm()
    cos = (d1 @ d2 / (d1.norm() * d2.norm())).item()
    for lam in (0.2, 0.5, 0.8):
        expected = d1.norm().item() * math.sqrt(1 - 2 * (1 - cos) * (lam - lam**2))
        assert math.isclose(torch.lerp(d1, d2, lam).norm().item(), expected, rel_tol=1e-5)
        assert torch.lerp(d1, d2, lam).norm() < slerp(d1, d2, lam).norm()


@pytest.mark.parametrize("seed", range(20))
def test_identical_and_collinear_vectors_fall_back_to_lerp_without_nan(seed):
    d = torch.randn(40, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(slerp(d, d, 0.3), d, atol=1e-6)
    assert torch.allclose(slerp(d, 2 * d, 0.5), 1.5 * d, atol=1e-5)
    opposite = slerp(d, -d, 0.5)  # ill-conditioned in fp32: finite and ~0 relative to ‖d‖
    assert torch.isfinite(opposite).all() and opposite.norm() < 1e-3 * d.norm()


def test_zero_task_vector_falls_back_to_lerp():
    d = torch.randn(10)
    zero = torch.zeros(10)
    assert torch.allclose(slerp(zero, d, 0.25), 0.25 * d)
    assert torch.isfinite(slerp(zero, zero, 0.5)).all()


def test_m_equals_one_is_the_identity_and_identical_vectors_return_themselves():
    d = torch.randn(3, 3)
    assert torch.equal(slerp_task_vectors([d]), d)
    assert torch.allclose(slerp_task_vectors([d, d, d, d]), d, atol=1e-6)


def test_m_greater_than_two_is_iterative_with_weight_one_over_m():
    g = torch.Generator().manual_seed(3)
    ds = [torch.randn(20, generator=g) for _ in range(3)]
    expected = hand_slerp(hand_slerp(ds[0], ds[1], 0.5), ds[2], 1 / 3)
    assert torch.allclose(slerp_task_vectors(ds), expected, atol=1e-5)


def test_merge_task_vectors_works_on_task_vectors_not_full_weights():
    g = torch.Generator().manual_seed(4)
    init = {"w": torch.randn(6, 4, generator=g) + 5, "b": torch.randn(4, generator=g)}
    runs = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(2)]
    merged = merge_task_vectors(init, lambda m, name: runs[m][name], 2, 0.5)
    for name in init:
        expected = init[name] + hand_slerp(runs[0][name] - init[name], runs[1][name] - init[name], 0.5)
        assert torch.allclose(merged[name], expected, atol=1e-5)


def test_liti_moves_the_init_towards_the_merge():
    init, merged = {"w": torch.zeros(3)}, {"w": torch.tensor([1.0, 2.0, 4.0])}
    assert torch.allclose(liti(init, merged, 0.3)["w"], torch.tensor([0.3, 0.6, 1.2]))
    assert torch.equal(liti(init, merged, 0.0)["w"], init["w"])
    assert torch.equal(liti(init, merged, 1.0)["w"], merged["w"])


def test_ema_update_matches_hand_computation():
    g = torch.Generator().manual_seed(5)
    ema, online = (
        [torch.randn(4, 4, generator=g), torch.randn(7, generator=g)],
        [
            torch.randn(4, 4, generator=g),
            torch.randn(7, generator=g),
        ],
    )
    expected = [(1 - 0.01) * e + 0.01 * o for e, o in zip(ema, online, strict=True)]
    ema_update_(ema, online, 0.01)
    for got, want in zip(ema, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-7)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("ids", torch.arange(5))


def test_tied_weights_appear_once_and_non_float_buffers_are_left_alone():
    model = Tied()
    state = model_state(model)
    assert list(state) == ["embed.weight"]
    copy_into(model, {"embed.weight": torch.ones(5, 3)})
    assert torch.equal(model.head.weight, torch.ones(5, 3)) and torch.equal(model.ids, torch.arange(5))
    with pytest.raises(KeyError):
        copy_into(model, {"other": torch.ones(5, 3)})


@pytest.mark.parametrize("chunk", [7, 1 << 20])  # tensors in many pieces, and each in one piece
@pytest.mark.parametrize("runs", [1, 2, 3, 4])
def test_streamed_merge_task_vectors_equals_the_per_tensor_definition(runs, chunk):
    g = torch.Generator().manual_seed(runs)
    init = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g), "big": torch.randn(300, generator=g)}
    finals = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(runs)]
    merged = merge_task_vectors(init, lambda m, name: finals[m][name], runs, None, chunk=chunk)
    for name, base in init.items():
        expected = base + slerp_task_vectors([f[name] - base for f in finals])
        assert merged[name].shape == base.shape
        assert torch.allclose(merged[name], expected, atol=1e-5), name
    if runs > 2:  # the iterative merge is uniform: hand-check M = 3
        d = [f["big"] - init["big"] for f in finals]
        assert torch.allclose(
            slerp_task_vectors(d[:3]), hand_slerp(hand_slerp(d[0], d[1], 0.5), d[2], 1 / 3), atol=1e-5
        )


def test_merge_task_vectors_of_unchanged_runs_is_exactly_the_init():
    init = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    merged = merge_task_vectors(init, lambda m, name: init[name].clone(), 2, 0.5, chunk=4)
    assert all(torch.equal(merged[name], init[name]) for name in init)


def merged_task_vector(deltas: list[torch.Tensor], chunk: int = 1 << 20, method: str = "slerp") -> torch.Tensor:
    """`merge_task_vectors` of runs θ_m = θ_init + δ_m with θ_init = 0, so the task vectors it takes
    are the δ_m exactly (with another θ_init, θ_init + δ_m rounds, and so do the task vectors)."""
    init = {"t": torch.zeros_like(deltas[0])}
    runs = [{"t": init["t"] + d} for d in deltas]
    merged = merge_task_vectors(init, lambda m, name: runs[m][name], len(deltas), None, method, chunk=chunk)
    return merged["t"].double()


@pytest.mark.parametrize("size", [1, 7, 4096])
@pytest.mark.parametrize("factor", [1.0, 0.5, 3.0])
def test_antipodal_task_vectors_merge_as_lerp(size, factor):
    """δ2 = −c δ1 is collinear: SLERP is LERP, (δ1 + δ2) / 2 = (1 − c) δ1 / 2, not a blow-up."""
    d = torch.randn(size, generator=torch.Generator().manual_seed(size)) * 1e-3
    expected = ((1 - factor) / 2) * d.double()
    for got in (merged_task_vector([d, -factor * d]), slerp(d, -factor * d, 0.5).double()):
        assert torch.allclose(got, expected, atol=1e-9 * float(d.abs().max()) + 1e-12, rtol=1e-5)


@pytest.mark.parametrize("seed", range(10))
def test_one_element_task_vectors_are_collinear_and_merge_as_lerp(seed):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(1, generator=g) * 10 ** float(torch.randint(-6, 0, (1,), generator=g)) for _ in range(3)]
    pair = deltas[:2]
    assert torch.allclose(merged_task_vector(pair), (pair[0].double() + pair[1].double()) / 2, rtol=1e-5)
    three = sum(d.double() for d in deltas) / 3  # iterative LERP with 1/2 then 1/3 is the mean
    assert torch.allclose(merged_task_vector(deltas), three, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_a_third_run_after_a_cancelling_pair_gets_weight_one_third(chunk):
    g = torch.Generator().manual_seed(7)
    d1, d3 = torch.randn(64, generator=g), torch.randn(64, generator=g)
    expected = d3.double() / 3  # s2 = LERP(d1, −d1) = 0, then LERP(0, d3; 1/3)
    assert torch.allclose(merged_task_vector([d1, -d1, d3], chunk=chunk), expected, atol=1e-6)
    assert torch.allclose(slerp_task_vectors([d1, -d1, d3]).double(), expected, atol=1e-6)


def test_task_vectors_of_rounded_weights_are_merged_as_float64_merges_those_differences():
    """With θ_init = 0.5, runs θ_init ± d round to weights whose differences are antipodal only up
    to rounding (sin Ω ≈ 1e-5): that is what is merged, exactly as float64 SLERP of them does."""
    d = torch.randn(512, generator=torch.Generator().manual_seed(11)) * 1e-3
    init = {"t": torch.full_like(d, 0.5)}
    runs = [{"t": init["t"] + d}, {"t": init["t"] - d}]
    merged = merge_task_vectors(init, lambda m, name: runs[m][name], 2, None)["t"].double() - 0.5
    deltas = [run["t"].double() - 0.5 for run in runs]  # exact: the subtraction of close floats
    a, b = deltas
    omega = math.acos(float(a @ b / (a.norm() * b.norm())))
    expected = (math.sin(omega / 2) * a + math.sin(omega / 2) * b) / math.sin(omega)
    assert math.sin(omega) > 1e-6  # above the fallback: a genuine SLERP
    assert (merged - expected).norm() < 1e-2 * expected.norm()


def test_nearly_antipodal_vectors_are_slerped_like_float64():
    """Not collinear: a genuine SLERP, which keeps the norm of equal-norm inputs, unlike LERP."""
    g = torch.Generator().manual_seed(8)
    d1 = torch.randn(2048, generator=g)
    d2 = -d1 + 0.05 * torch.randn(2048, generator=g)
    d2 = d2 * (d1.norm() / d2.norm())
    got, expected = merged_task_vector([d1, d2]), hand_slerp(d1, d2, 0.5).double()
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))
    assert abs(float(got.norm()) - float(d1.norm())) < 1e-3 * float(d1.norm())


def test_lerp_of_task_vectors_is_their_average():
    g = torch.Generator().manual_seed(9)
    deltas = [torch.randn(33, generator=g) for _ in range(3)]
    got = merged_task_vector(deltas, method="lerp")
    assert torch.allclose(got, sum(d.double() for d in deltas) / 3, atol=1e-6)
