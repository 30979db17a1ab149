import pytest
import torch

from warp_rlhf import activations
from warp_rlhf.models import load_causal_lm


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


@pytest.mark.parametrize("bias", [False, True])
def test_lean_backward_gives_the_same_output_and_gradients(tiny_policy, bias):
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
            assert model.get_input_embeddings().sparse == lean  # tied: sparse rows inside
        assert model.model.layers[0].mlp.forward.__func__ is type(model.model.layers[0].mlp).forward  # restored
        assert not model.get_input_embeddings().sparse
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
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
        assert not model.get_input_embeddings().sparse
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
    per_layer = (saved_bytes(False) - saved_bytes(True)) / model.config.num_hidden_layers
    assert per_layer == 2 * mlp_activation  # act(gate) and act(gate) ⊙ up are no longer kept


def test_logsumexp_in_pieces_is_torchs(monkeypatch):
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 10
    monkeypatch.setattr(activations, "CHUNK_BYTES", 2 * 7 * 4)  # pieces of 2 rows: 8 pieces
    got = activations.logsumexp(logits)
    assert got.shape == (3, 5, 1)
    assert torch.allclose(got, torch.logsumexp(logits, dim=-1, keepdim=True), atol=1e-6)
