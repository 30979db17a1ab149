import pytest
import torch

from warp_rlhf.cpu import gemm
from warp_rlhf.stages.models import load_causal_lm

needs_onednn = pytest.mark.skipif(not gemm.runs_on_onednn(torch.zeros(1)), reason="no oneDNN on this torch build")


@pytest.fixture
def policy(tiny_policy):
    return load_causal_lm(str(tiny_policy)).eval()


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_hand_computation(bias):
    x = torch.tensor([[[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]], requires_grad=True)  # (1, 2, 3)
    weight = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]], requires_grad=True)  # (2, 3)
    b = torch.tensor([0.5, -2.0], requires_grad=True) if bias else None
    y = gemm.linear(x, weight, b)
    # y = x Wᵀ + b by hand: row 1 (1, 2, 0) → (1, 1); row 2 (0, −1, 3) → (6, 0.5)
    want = torch.tensor([[[1.0, 1.0], [6.0, 0.5]]]) + (torch.tensor([0.5, -2.0]) if bias else 0)
    assert y.shape == (1, 2, 2) and torch.allclose(y, want)
    assert "OneDnnLinear" in type(y.grad_fn.next_functions[0][0]).__name__
    y.div_(2.0)  # a model may modify a linear layer's output in place
    grad = torch.tensor([[[1.0, 0.0], [2.0, -1.0]]])
    y.backward(grad)
    g = grad / 2  # through the division
    # ∂x = ∂y W, ∂W = ∂yᵀ x, ∂b = Σ_rows ∂y
    assert torch.allclose(x.grad, torch.tensor([[[0.5, 0.0, 1.0], [1.5, -0.5, 1.75]]]))
    assert torch.allclose(weight.grad, torch.tensor([[0.5, 0.0, 3.0], [0.0, 0.5, -1.5]]))
    if bias:
        assert torch.allclose(b.grad, g.sum((0, 1)))


def test_other_devices_and_dtypes_take_the_plain_functions():
    x, weight = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    assert not gemm.runs_on_onednn(x, weight)
    y = gemm.linear(x.requires_grad_(), weight)
    assert y.grad_fn.name() != "OneDnnLinearBackward" and torch.equal(y, torch.nn.functional.linear(x, weight))
    assert torch.equal(gemm.input_gradient(y.detach(), weight), y.detach() @ weight)


@needs_onednn
def test_onednn_linears_give_the_same_logits_and_leave_the_model_as_it_was(policy):
    ids = torch.randint(3, policy.config.vocab_size, (4, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = [policy(input_ids=ids[:, :1]).logits, policy(input_ids=ids).logits]
        for rows in (4, None):  # packed for 4 rows; the module's own weight
            with gemm.onednn_linears(policy, rows=rows):
                assert sum("forward" in vars(m) for m in policy.modules()) > 3  # the linears are swapped
                got = [policy(input_ids=ids[:, :1]).logits, policy(input_ids=ids).logits]  # 4 rows; 12 rows
            assert not any("forward" in vars(m) for m in policy.modules())
            for logits, want in zip(got, plain, strict=True):
                assert torch.allclose(logits, want, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("rows", [2, None])
def test_onednn_linears_give_autograds_gradients(policy, rows):
    ids = torch.randint(3, policy.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    policy.zero_grad(set_to_none=True)
    policy(input_ids=ids).logits.square().mean().backward()
    want = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    with gemm.onednn_linears(policy, rows=rows):
        logits = policy(input_ids=ids).logits
    assert "OneDnnLinear" in type(logits.grad_fn.next_functions[0][0]).__name__  # the output layer's product
    logits.square().mean().backward()
    for parameter, expected in zip(policy.parameters(), want, strict=True):
        assert parameter.grad is not None
        assert torch.allclose(parameter.grad, expected, rtol=1e-4, atol=1e-6)
    policy.zero_grad(set_to_none=True)


@needs_onednn
def test_nested_onednn_linears_give_back_the_enclosing_ones(policy):
    ids = torch.randint(3, policy.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), gemm.onednn_linears(policy, rows=2) as outer:
        head = policy.get_output_embeddings()
        packed_forward = vars(head)["forward"]
        with gemm.onednn_linears(policy) as inner:
            assert inner[head] is head.weight.detach() or torch.equal(inner[head], head.weight)
            assert vars(head)["forward"] is not packed_forward
        assert vars(head)["forward"] is packed_forward and head in outer
        policy(input_ids=ids)
    assert "forward" not in vars(head)
