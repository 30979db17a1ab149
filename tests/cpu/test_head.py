"""The output layer and the token log-probs as one function, against autograd of log_softmax."""

import pytest
import torch

from warp_rlhf.cpu import activations, head


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_logprobs_equal_the_output_layer_then_log_softmax(temperature, monkeypatch):
    monkeypatch.setattr(head, "CHUNK_BYTES", 8 * 4 * 3)  # backward over pieces of 3 columns (and one of 2)
    monkeypatch.setattr(activations, "CHUNK_BYTES", 8 * 4 * 3)  # logsumexp and entropy over pieces of rows
    torch.manual_seed(0)
    hidden, weight = torch.randn(8, 5, requires_grad=True), torch.randn(11, 5, requires_grad=True)
    ids, upstream = torch.tensor([0, 10, 3, 3, 5, 9, 1, 7]), torch.randn(8)
    logprobs, entropy = head.head_logprobs(hidden, weight, ids, temperature, with_entropy=True)
    (logprobs * upstream).sum().backward()
    ours = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    log_p = torch.log_softmax(hidden @ weight.T / temperature, -1)
    (log_p.gather(-1, ids[:, None]).squeeze(-1) * upstream).sum().backward()
    assert torch.allclose(logprobs, log_p.gather(-1, ids[:, None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(entropy, -(log_p.exp() * log_p).sum(-1), atol=1e-5) and not entropy.requires_grad
    assert torch.allclose(ours[0], hidden.grad, atol=1e-5) and torch.allclose(ours[1], weight.grad, atol=1e-5)


def test_head_logprobs_gradcheck():
    hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([5, 0, 2, 2])
    assert torch.autograd.gradcheck(lambda h, w: head.head_logprobs(h, w, ids, 0.8)[0], (hidden, weight))
