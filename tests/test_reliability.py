"""Bad input: one clear line, exit code 2, nothing left behind. Crashes: SIGKILL, then --resume."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli_process, make_tokenizer, share_reward_model, write_reviews_csv
from warp_rlhf.cli import main
from warp_rlhf.stages.models import load_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_backbone):
    """Files and folders that are wrong in one way each."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("bad")
    empty = root / "empty.csv"
    empty.write_text("text,label\n")
    (root / "not_a_model").mkdir()
    two_heads = root / "two_heads"
    AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=2).save_pretrained(two_heads)
    make_tokenizer().save_pretrained(two_heads)
    blocker = root / "a_file"
    blocker.write_text("x")
    return {
        "empty": empty,
        "three_labels": write_reviews_csv(root / "three.csv", 100, labels=(2, 0)),
        "one_class": write_reviews_csv(root / "one.csv", 100, labels=(1, 1)),
        "not_a_model": root / "not_a_model",
        "two_heads": two_heads,
        "blocker": blocker,
    }


CASES = [
    ("missing data", lambda b, t: ["--dataset", "/no/such/reviews.csv"], "dataset /no/such/reviews.csv does not exist"),
    ("empty data", lambda b, t: ["--dataset", str(b["empty"])], "cannot be loaded: it holds no rows"),
    ("missing text column", lambda b, t: ["--text_column", "review"], "has no column 'review' (columns: text, label)"),
    ("missing label column", lambda b, t: ["--label_column", "stars"], "has no column 'stars'"),
    ("labels not binary", lambda b, t: ["--dataset", str(b["three_labels"])], "label 2 is not binary"),
    ("one class", lambda b, t: ["--dataset", str(b["one_class"])], "has only one class"),
    ("too few rows", lambda b, t: ["--rl_prompts", "100000"], "too few for"),
    ("policy path missing", lambda b, t: ["--policy", "/no/such/model"], "policy /no/such/model does not exist"),
    ("policy not a model", lambda b, t: ["--policy", str(b["not_a_model"])], "is not a model folder (no config.json)"),
    ("policy not a causal LM", lambda b, t: ["--policy", str(t)], "is a BertModel, not a causal language model"),
    ("two reward scores", lambda b, t: ["--reward_model", str(b["two_heads"])], "gives 2 scores per text, not 1"),
    ("prompt longer than the context", lambda b, t: ["--prompt_max_tokens", "120", "--max_new_tokens", "20"],
     "prompt_max_tokens + max_new_tokens = 140 is out of range: the policy's context window is 128"),
    ("unwritable output", lambda b, t: ["--output_dir", str(b["blocker"] / "run")], "cannot be written"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "flags", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_left(case, flags, message, tiny_args, tiny_backbone, bad_inputs,
                                                       tmp_path, capsys):  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        main(["reward", *tiny_args, *flags(bad_inputs, tiny_backbone)])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    errors = [line for line in err.splitlines() if "error" in line]  # progress bars may precede it
    assert len(errors) == 1 and errors[0].startswith("warp-rlhf: error: ") and message in errors[0], err
    assert err.endswith(errors[0] + "\n")
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_without_pad_token_gets_its_eos(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == loaded.eos_token_id


def test_non_finite_policy_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_policy, tmp_path):
    from tests.helpers import PROMPTS, good_fraction, tiny_config
    from warp_rlhf.algorithm.reinforce import RunSpec, Trainer, TrainingError
    from warp_rlhf.algorithm.run_loop import train_run
    from warp_rlhf.layout import RunFolder
    from warp_rlhf.stages.models import load_causal_lm

    policy = load_causal_lm(str(tiny_policy))
    config = tiny_config(tmp_path, iterations=1, runs=1, steps=6, checkpoint_every=2)
    calls = {"n": 0}

    def poisoned(prompts, completions, completion_ids=None):  # after 3 steps the weights become NaN
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(policy.parameters()).fill_(float("nan"))
        return good_fraction(prompts, completions)

    trainer = Trainer(config, policy, make_tokenizer(), poisoned, PROMPTS)
    folder = RunFolder(tmp_path / "iter_1" / "run_1")
    with pytest.raises(TrainingError, match="iter 1 run 1 step 3: the loss is not finite"):
        train_run(trainer, RunSpec(1, 1, folder, config.ema_rate), None, config.steps)
    assert (folder.checkpoint / "state.json").exists()


def test_no_pickle_and_no_remote_code_by_default():
    source = "\n".join(p.read_text() for p in (SRC / "warp_rlhf").rglob("*.py"))
    assert "torch.load(" not in source and "import pickle" not in source
    from warp_rlhf.config import WarpConfig

    assert WarpConfig().trust_remote_code is False


KILL_POINTS = [
    "iter_1/run_1/.checkpoint.tmp-*",  # while a checkpoint is being written (or just after)
    "iter_1/run_1/done.json",  # between runs
    "iter_1/slerp.safetensors",  # at the merge
    "iter_2/run_1/metrics.jsonl",  # during a run of the second iteration
    "iter_2/run_2/checkpoint/state.json",  # just after a checkpoint
]


def _train_until(args: list[str], pattern: str, out: Path) -> None:
    process = cli_process(["train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not list(out.glob(pattern)):
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()



def _status(pid: int) -> dict[str, str]:
    lines = (Path("/proc") / str(pid) / "status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the child's signal masks in /proc")
def test_a_command_the_tests_start_takes_ctrl_c_even_when_the_tests_ignore_it(tiny_args):
    """`nohup`, `trap '' INT` or a CI runner start the tests with SIGINT ignored; the commands they
    start (`cli_process`) must still stop on Ctrl-C, as the signal tests expect."""
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = cli_process(["train", *tiny_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        signal.signal(signal.SIGINT, ignored)
    try:
        status = _status(process.pid)  # exec has set its dispositions; it is still importing
        assert not status["State"].startswith("Z"), "the command ended before it could be read"
        assert not int(status["SigIgn"], 16) & 1 << (signal.SIGINT - 1)
    finally:
        process.kill()
        process.wait()

@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bitwise_equal(tiny_args, tmp_path):
    flags = ["--iterations", "2", "--runs", "2", "--steps", "6", "--checkpoint_every", "2", "--batch_size", "4",
             "--learning_rate", "1e-3", "--reward_epochs", "0.5", "--device", "cpu"]  # fmt: skip
    reference = [*tiny_args, *flags, "--output_dir", str(tmp_path / "reference")]
    assert main(["train", *reference]) == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    share_reward_model(tmp_path / "reference", killed)  # the same reward model, so only WARP is compared
    args = [*tiny_args, *flags, "--output_dir", str(killed), "--resume"]
    for pattern in KILL_POINTS:
        _train_until(args, pattern, killed)
    finished_before = {p.parent.name + "/" + p.parent.parent.name for p in killed.glob("iter_*/run_*/done.json")}
    assert main(["train", *args]) == 0
    for name in ("iter_1/slerp.safetensors", "iter_2/slerp.safetensors", "final/model.safetensors"):
        a, b = load_file(tmp_path / "reference" / name), load_file(killed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert finished_before, "the kills should have left finished runs to reuse"
    assert not list(killed.rglob(".*tmp-*")), "no temporary file is left"
