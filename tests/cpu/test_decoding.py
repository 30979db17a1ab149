import pytest
import torch

from tests.helpers import make_tokenizer
from warp_rlhf.cpu import decoding, packing
from warp_rlhf.cpu.gemm import onednn_linears, runs_on_onednn
from warp_rlhf.policy import sampling
from warp_rlhf.stages.models import load_causal_lm

needs_onednn = pytest.mark.skipif(not runs_on_onednn(torch.zeros(1)), reason="no oneDNN on this torch build")


@pytest.fixture
def policy(tiny_policy):
    return load_causal_lm(str(tiny_policy)).eval()


def test_rotate_is_the_rotary_embedding_by_hand():
    t = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # (rows, heads, dim)
    cos, sin = torch.tensor([[[0.5, 0.25, 0.5, 0.25]]]), torch.tensor([[[2.0, 3.0, 2.0, 3.0]]])
    signed_sin = torch.cat([-sin[..., :2], sin[..., 2:]], dim=-1)
    # t · cos + rotate_half(t) · sin, rotate_half([1, 2, 3, 4]) = [−3, −4, 1, 2]
    want = torch.tensor([[[0.5 - 6.0, 0.5 - 12.0, 1.5 + 2.0, 1.0 + 6.0]]])
    assert torch.equal(decoding.rotate(t, cos, signed_sin), want)


def test_rms_norm_is_the_models(policy):
    x = torch.randn(3, policy.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    norm = policy.base_model.layers[0].input_layernorm
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    assert torch.allclose(decoding.rms_norm(x, norm), norm(x), atol=1e-6)


def tiny_model(kind: str, **options):
    """A 2-layer model of another architecture the decoder writes out (Qwen2 has q/k/v biases)."""
    import transformers

    torch.manual_seed(0)
    sizes = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    config = getattr(transformers, f"{kind}Config")(**sizes, **options)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    for module in model.modules():  # nonzero biases, so that a missing one shows
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    return model


@needs_onednn
@pytest.mark.parametrize(
    ("kind", "options", "written_out"),
    [("Mistral", {"sliding_window": None}, True), ("Qwen2", {}, True),
     ("Mistral", {"sliding_window": 4096}, False)],  # a windowed cache keeps the model's own decode
)  # fmt: skip
def test_other_llama_architectures(kind, options, written_out):
    model = tiny_model(kind, **options)
    assert decoding.decodes_exactly(model) is written_out
    if kind == "Qwen2":
        assert model.base_model.layers[0].self_attn.q_proj.bias is not None


@needs_onednn
@pytest.mark.parametrize("rows_hint", [3, None])  # packed weights (as in sampling); the modules' own
def test_llama_decoder_gives_the_models_own_logits(policy, rows_hint):
    assert decoding.decodes_exactly(policy)
    prompt_ids = torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9], [10, 11, 12, 13]])
    prompt_mask = (torch.arange(4) >= torch.tensor([[2], [1], [0]])).long()  # left padding
    tokens = torch.tensor([[14, 15, 16], [17, 18, 19], [20, 21, 22], [23, 24, 25]])  # 4 steps of 3 rows
    with torch.no_grad(), onednn_linears(policy, rows=rows_hint) as weights:
        cache, _ = packing.prefill(policy, prompt_ids, prompt_mask, packed=False)
        lean = decoding.LlamaDecoder(policy, weights, cache, prompt_mask, max_new_tokens=len(tokens) + 1)
        own = decoding.ModelDecoder(policy, cache, prompt_mask)
        for token in tokens:
            want, got = own(token), lean(token)
            assert got.shape == want.shape == (3, policy.config.vocab_size)
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_model_the_probe_rejects_decodes_with_its_own_forward(policy):
    for layer in policy.base_model.layers:
        layer.mlp.act_fn = torch.nn.GELU()  # no longer what the config's "silu" says
    assert not decoding.decodes_exactly(policy)
    decoder = decoding.decoder(policy, {"any": "weights"}, None, torch.ones(1, 2), 3, lean=False)
    assert isinstance(decoder, decoding.ModelDecoder)


@needs_onednn
def test_sampling_draws_the_same_tokens_with_either_decoder(policy, monkeypatch):
    """The probe's verdict, as sampling reads it (`warp_rlhf.cpu`), picks the decoder; each verdict
    must decode with its own decoder, or the comparison would be of one decoder with itself."""
    prompts, tokenizer = ["the movie was", "a", "the plot and the actor"], make_tokenizer()
    steps = []  # the class of the decoder behind each decode step

    def counted_decoder(*args, **options):
        step = decoding.decoder(*args, **options)

        def counted(token):
            steps.append(type(step))
            return step(token)

        return counted

    monkeypatch.setattr(sampling.cpu, "decoder", counted_decoder)
    runs = []
    for lean, used in ((True, decoding.LlamaDecoder), (False, decoding.ModelDecoder)):
        monkeypatch.setattr(sampling.cpu, "decodes_exactly", lambda model, lean=lean: lean)
        steps.clear()
        torch.manual_seed(3)
        batch, logits = sampling.sample(policy, tokenizer, prompts, temperature=0.7, max_new_tokens=6, with_logits=True)
        assert steps and set(steps) == {used}
        runs.append((batch.input_ids, logits))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-5)
