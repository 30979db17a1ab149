"""The model card and `push_to_hub`: a card the hub reads (metadata, settings, rewards, datasets,
and once evaluated the evaluation table), final/ pushed after training and again after
evaluation, and every way a push cannot happen said in one line, the trained policy kept."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import TRAIN_FLAGS, cli_error
from warp_rlhf import WarpConfig, WarpTrainer
from warp_rlhf.cli import main
from warp_rlhf.stages.hub import model_card
from warp_rlhf.stages.plots import cell

FLAGS = [*TRAIN_FLAGS, "--iterations", "1", "--front_points", "2", "--trajectory_points", "1"]


def card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)  # a local file: read as the hub reads a repository's README.md


def test_the_card_is_a_hub_card_naming_the_base_model_datasets_and_settings(tmp_path):
    config = WarpConfig(
        policy="HuggingFaceTB/SmolLM2-135M-Instruct", dataset="stanfordnlp/imdb",
        eval_dataset=str(tmp_path / "held.jsonl"), reward_funcs=["trained", "lvwerra/distilbert-imdb[POSITIVE]"],
        reward_weights=[1.0, 0.5], iterations=3, runs=4, steps=50, ema_rate=0.02, liti_rate=0.3, beta=0.2,
        output_dir=str(tmp_path / "my-warp"),
    )  # fmt: skip
    (tmp_path / "README.md").write_text(model_card(config, {"iterations": []}, tmp_path / "final"))
    loaded = card(tmp_path / "README.md")
    assert loaded.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert loaded.data.datasets == ["stanfordnlp/imdb"]  # the held-out file is no hub dataset
    assert loaded.data.library_name == "transformers" and loaded.data.pipeline_tag == "text-generation"
    assert {"warp", "rlhf", "trl-compatible"} <= set(loaded.data.tags) and loaded.data.model_name == "my-warp"
    for row in ("| I | iterations | 3 |", "| M | ", "| 4 |", "| T | steps per run | 50 |", "| 0.02 |", "| 0.3 |",
                "| 0.25 |", "| 0.2 |", "[lvwerra/distilbert-imdb](https://huggingface.co/lvwerra/distilbert-imdb)",
                "output `POSITIVE` | 0.5 |", "- held-out prompts: `held.jsonl`"):  # fmt: skip
        assert row in loaded.text, row
    assert "## Evaluation" not in loaded.text

    local = WarpConfig(policy=str(tmp_path), dataset=str(tmp_path / "prompts.jsonl"), method="reinforce")
    (tmp_path / "README.md").write_text(model_card(local, {}, tmp_path / "final"))
    loaded = card(tmp_path / "README.md")
    assert loaded.data.base_model is None and loaded.data.datasets is None and "warp" not in loaded.data.tags
    assert "# REINFORCE baseline policy" in loaded.text and "| steps | I·M·T | 400 |" in loaded.text


@pytest.fixture
def hub(monkeypatch):
    """The hub, online and logged in, as a recorder of every upload and the card it sent."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_token")
    uploads = []

    def create_repo(self, repo_id, **options):
        assert options["exist_ok"]
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")  # the token's namespace

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **options):
        readme = (Path(folder_path) / "README.md").read_text()
        uploads.append(SimpleNamespace(repo_id=repo_id, folder=Path(folder_path), message=commit_message, card=readme))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


def test_run_pushes_final_after_training_and_its_evaluated_card_after_evaluation(
    tiny_args, tmp_path, hub, capsys, monkeypatch
):
    functions = tmp_path / "functions.py"
    functions.write_text("def brevity(completions, **kwargs):\n    return [1.0 - len(c) / 40 for c in completions]\n")
    flags = [*tiny_args, *FLAGS, "--reward_funcs", f"{functions}:brevity"]
    assert main(["run", *flags, "--push_to_hub", "true", "--hub_model_id", "me/warp-tiny"]) == 0
    out = tmp_path / "run"
    assert [(u.repo_id, u.folder, u.message) for u in hub] == [
        ("me/warp-tiny", out / "final", "End of training"),
        ("me/warp-tiny", out / "final", "Evaluation results"),
    ]
    assert "## Evaluation" not in hub[0].card and hub[1].card == (out / "final" / "README.md").read_text()
    assert "final/ pushed → https://huggingface.co/me/warp-tiny" in capsys.readouterr().out

    policies = json.loads((out / "eval" / "results.json").read_text())["policies"]
    warp, baseline = card(out / "final" / "README.md"), card(out / "reinforce" / "final" / "README.md")
    assert f"| warp | {cell(policies['warp'], 'reward')} | {cell(policies['warp'], 'judge')} |" in warp.text
    assert f"| sft | {cell(policies['sft'], 'reward')} |" in warp.text and 'model="me/warp-tiny"' in warp.text
    last = f"reinforce_{1 * 2 * 3}"
    assert f"| {last} | {cell(policies[last], 'reward')} |" in baseline.text
    assert "| `brevity` | 1 |" in warp.text and baseline.data.base_model is None

    def unreachable(self, **options):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(__import__("huggingface_hub").HfApi, "upload_folder", unreachable)
    line = cli_error(["train", *flags, "--push_to_hub", "true", "--resume"], capsys)
    assert f"push_to_hub: the hub cannot be reached (ConnectionError: Failed to resolve 'huggingface.co'): the " \
           f"trained policy is in {out / 'final'}" in line  # fmt: skip
    assert (out / "final" / "model.safetensors").exists()


def test_a_push_that_cannot_happen_is_one_line_before_any_work(tiny_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = cli_error(["train", *tiny_args, "--push_to_hub", "true"], capsys)
    assert line.endswith("push_to_hub: the hub cannot be reached (offline: HF_HUB_OFFLINE is set): unset it or set "
                         "push_to_hub false")  # fmt: skip
    assert not (tmp_path / "run").exists()
    line = cli_error(["train", *tiny_args, "--hub_model_id", "a b"], capsys)
    assert line.endswith("hub_model_id='a b' is out of range: must be a repository id, name or namespace/name")


def test_no_token_is_one_line_before_any_work(tiny_args, tmp_path, capsys, monkeypatch, hub):
    monkeypatch.setattr(__import__("huggingface_hub"), "get_token", lambda: None)
    line = cli_error(["train", *tiny_args, "--push_to_hub", "true"], capsys)
    assert line.endswith("push_to_hub: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    assert not (tmp_path / "run").exists() and not hub


def test_warp_trainer_pushes_after_train_as_trl(tiny_policy, tmp_path, hub):
    from datasets import Dataset

    def brevity(completions, **kwargs):
        return [1.0 - len(c) / 40 for c in completions]

    args = WarpConfig(output_dir=str(tmp_path / "warp-tiny"), push_to_hub=True, iterations=1, runs=2, steps=1,
                      batch_size=4, max_new_tokens=4, rl_prompts=12, eval_prompts=4, device="cpu")  # fmt: skip
    prompts = Dataset.from_list([{"prompt": text} for text in ["the movie", "a film", "it is", "the plot was"] * 4])
    WarpTrainer(str(tiny_policy), [brevity], args=args, train_dataset=prompts).train()
    assert [(u.repo_id, u.folder, u.message) for u in hub] == [
        ("me/warp-tiny", tmp_path / "warp-tiny" / "final", "End of training")
    ]
