"""Reward functions for warp-rlhf's `reward_funcs`, called as TRL calls them:
f(prompts, completions, **columns) -> list[float], one value per completion.

With conversational prompts, `prompts` are lists of {role, content} messages and each completion
is `[{"role": "assistant", "content": text}]`; with standard ones, both are plain texts.
"""


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def brevity(prompts, completions, **columns) -> list[float]:
    """A format term: minus the number of words over 20, so long answers cost."""
    return [-max(0, len(_text(c).split()) - 20) / 10 for c in completions]


def ends_a_sentence(prompts, completions, **columns) -> list[float]:
    """1 when the completion ends a sentence (., ! or ?), else 0."""
    return [float(_text(c).rstrip().endswith((".", "!", "?"))) for c in completions]
