import pytest
import torch

from warp_rlhf.cpu import activations
from warp_rlhf.stages.models import load_causal_lm


def test_token_logprobs_by_hand_and_gradcheck():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[2, 0]])
    got = activations.token_logprobs(logits, ids)
    by_hand = [2.0 - torch.log(torch.tensor(1 + torch.e + torch.e**2)), 3.0 - torch.log(torch.tensor(torch.e**3 + 2))]
    assert torch.allclose(got, torch.stack(by_hand).to(got).view(1, 2))
    assert torch.autograd.gradcheck(activations.token_logprobs, (torch.randn(2, 3, 5, dtype=torch.float64,
                                    requires_grad=True), torch.randint(0, 5, (2, 3))))  # fmt: skip


def test_token_logprobs_gradient_equals_autograd_of_log_softmax():
    logits = torch.randn(3, 4, 7, requires_grad=True)
    ids, weight = torch.randint(0, 7, (3, 4)), torch.randn(3, 4)
    (activations.token_logprobs(logits, ids) * weight).sum().backward()
    ours, logits.grad = logits.grad, None
    (torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1) * weight).sum().backward()
    assert torch.allclose(ours, logits.grad, atol=1e-6)


@pytest.mark.parametrize(("bias", "backward_inside"), [(False, True), (True, True), (False, False)])
def test_lean_backward_gives_the_same_output_and_gradients(tiny_policy, bias, backward_inside):
    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_policy)).eval()
    if bias:
        for layer in model.model.layers:
            layer.mlp.down_proj.bias = torch.nn.Parameter(torch.randn(layer.mlp.down_proj.out_features))
    ids = torch.randint(3, model.config.vocab_size, (3, 6))
    results = []
    for lean in (False, True):
        model.zero_grad(set_to_none=True)
        with activations.lean_backward(model) if lean else torch.enable_grad():
            logits = model(input_ids=ids).logits
            loss = (logits * torch.linspace(-1, 1, logits.shape[-1])).sum()
            if backward_inside:  # the tied embedding's rows added in place; after the context, as a sparse gradient
                loss.backward()
        assert model.model.layers[0].mlp.forward.__func__ is type(model.model.layers[0].mlp).forward  # restored
        assert "forward" not in vars(model.get_input_embeddings())
        if not backward_inside:
            loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (lean, lean_grads) = results
    assert torch.equal(plain, lean)
    assert plain_grads.keys() == lean_grads.keys()
    for name in plain_grads:
        assert not lean_grads[name].is_sparse  # the tied embedding's rows were added to a dense gradient
        assert torch.allclose(plain_grads[name], lean_grads[name], atol=1e-6), name


def test_an_untied_embedding_keeps_dense_gradients(tiny_policy):
    model = load_causal_lm(str(tiny_policy)).eval()
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie
    with activations.lean_backward(model):
        assert "forward" not in vars(model.get_input_embeddings())  # left as it is
        model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    assert not model.get_input_embeddings().weight.grad.is_sparse


def test_lean_backward_saves_less_for_the_backward_pass(tiny_policy):
    model = load_causal_lm(str(tiny_policy)).eval()
    ids = torch.randint(3, model.config.vocab_size, (4, 16))

    def saved_bytes(lean: bool) -> int:
        storages = {}

        def keep(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        lean_or_not = activations.lean_backward(model) if lean else torch.enable_grad()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), lean_or_not:
            model(input_ids=ids)
        return sum(storages.values())

    mlp_activation = 4 * 16 * model.config.intermediate_size * 4  # one (B, T, ffn) fp32 tensor
    normalised = 4 * 16 * model.config.hidden_size * 4  # one (B, T, d) fp32 tensor
    layers = model.config.num_hidden_layers
    # per layer: act(gate) and act(gate) ⊙ up, and each of the two norms' x / rms; the final norm's too
    assert saved_bytes(False) - saved_bytes(True) == layers * (2 * mlp_activation + 2 * normalised) + normalised


def test_logsumexp_in_pieces_is_torchs(monkeypatch):
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 10
    monkeypatch.setattr(activations, "CHUNK_BYTES", 2 * 7 * 4)  # pieces of 2 rows: 8 pieces
    got = activations.logsumexp(logits)
    assert got.shape == (3, 5, 1)
    assert torch.allclose(got, torch.logsumexp(logits, dim=-1, keepdim=True), atol=1e-6)


def test_rms_norm_by_hand_and_against_autograd():
    weight = torch.tensor([2.0, -1.0], requires_grad=True)
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    y = activations.rms_norm(x, weight, 0.5)  # mean(x²) + ε = 13, so y = w ⊙ x / √13
    assert torch.allclose(y, torch.tensor([[6.0, -4.0]]) / 13**0.5)
    grad = torch.tensor([[1.0, 3.0]])
    y.backward(grad)
    # dL/dw = g ⊙ x / √13; dL/dx = (u − x (u·x) / (2 · 13)) / √13 with u = g ⊙ w = (2, −3)
    assert torch.allclose(weight.grad, torch.tensor([3.0, 12.0]) / 13**0.5)
    u, xs = torch.tensor([2.0, -3.0]), torch.tensor([3.0, 4.0])
    assert torch.allclose(x.grad[0], (u - xs * (u @ xs) / 26) / 13**0.5)

    x = torch.randn(3, 4, 8, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)
    grad = torch.randn(3, 4, 8)
    ours = torch.autograd.grad(activations.rms_norm(x, weight, 1e-6), (x, weight), grad)
    plain = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    for got, expected in zip(ours, torch.autograd.grad(plain, (x, weight), grad), strict=True):
        assert torch.allclose(got, expected, atol=1e-5)


def test_a_norm_with_other_arithmetic_keeps_its_forward(tiny_policy):
    class OffsetNorm(torch.nn.Module):  # Gemma's: (1 + w) ⊙ x / rms
        def __init__(self, size: int):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(size)), 1e-6

        def forward(self, x):
            return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    model = load_causal_lm(str(tiny_policy)).eval()
    model.model.norm = OffsetNorm(model.config.hidden_size)
    with activations.lean_backward(model):
        assert "forward" not in vars(model.model.norm)
        assert "forward" in vars(model.model.layers[0].input_layernorm)  # Llama's own norm is replaced
        x = torch.randn(2, model.config.hidden_size)
        assert torch.allclose(model.model.norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert "forward" not in vars(model.model.layers[0].input_layernorm)
