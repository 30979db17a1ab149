"""Prompt datasets and preference pairs in TRL's formats, and chat templates.

- Prompt-only data: a `prompt_column` holding a text ("standard") or a list of {role, content}
  messages ("conversational"), rendered with the policy tokenizer's chat template
  (`add_generation_prompt=True`). The row's other columns are kept for the reward functions.
- Preference data for the reward model: `chosen` and `rejected`, with an implicit prompt (inside
  both) or an explicit `prompt` column, standard or conversational. A conversation is scored as
  the text its chat template renders.

Prompts start with the tokenizer's BOS token where it adds one (`policy.sampling.encode_prompts`),
so a rendered chat template, which writes its BOS token itself, loses that token here rather than
get two.
"""

from __future__ import annotations

import random
from typing import Any

from warp_rlhf.algorithm.reinforce import Prompt
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import DataError
from warp_rlhf.policy.sampling import adds_bos


def shown_columns(columns: list[str]) -> str:
    """Column names as a message lists them: a plain name as it is, any other (a byte-order mark,
    spaces around it, a control character) as Python writes it, so that 'prompt' and '\\ufeffprompt'
    do not look alike."""
    return ", ".join(name if name.isprintable() and name == name.strip() and name else repr(name) for name in columns)


def missing_column(message: str, wanted: list[str], columns: list[str]) -> DataError:
    """`message` about the missing columns `wanted`, with the columns there are and, for a column
    that is a wanted one but for a byte-order mark, spaces or case, what sets it apart."""
    notes = [note for name in columns for want in wanted if (note := _lookalike(name, want))]
    return DataError(f"{message} (columns: {shown_columns(columns)})" + "".join(f"; {note}" for note in notes))


def _lookalike(name: str, wanted: str) -> str | None:
    """What sets column `name` apart from `wanted` when they look alike, else None."""
    if name == wanted or name.replace("\ufeff", "").strip().casefold() != wanted.casefold():
        return None
    if name.startswith("\ufeff"):
        return (
            f"{name!r} starts with a byte-order mark (U+FEFF, which Excel writes at the start of a UTF-8 file): "
            "save the file as UTF-8 without BOM, or rename the column"
        )
    if "\ufeff" in name:
        return f"{name!r} holds a byte-order mark (U+FEFF): rename it {wanted!r}"
    if name != name.strip():
        return f"{name!r} has spaces around it: rename it {wanted!r}"
    return f"{name!r} differs from {wanted!r} in case: rename it {wanted!r}"


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)


def render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    """The text of a conversation through the tokenizer's chat template, without a leading BOS
    token where the tokenizer adds its own when it encodes."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"conversational data needs a chat template, and the tokenizer of {tokenizer.name_or_path} has none"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def with_template(tokenizers: list):
    """The first tokenizer that has a chat template (the scorer's own, then the policy's)."""
    return next((t for t in tokenizers if getattr(t, "chat_template", None)), tokenizers[-1])


def scored_text(prompt: Prompt, completion: str, tokenizers: list) -> str:
    """What a model-based reward reads: the prompt followed by the completion, or for a
    conversational prompt the whole conversation rendered by the first of `tokenizers` that has a
    chat template (the scorer's own, else the policy's)."""
    if not prompt.conversational:
        return prompt.text + completion
    template = with_template(tokenizers)
    messages = [*prompt.raw, {"role": "assistant", "content": completion}]
    return render(template, messages, generation_prompt=False)


def prompt_rows(table, config: WarpConfig, tokenizer, name: str) -> list[Prompt]:
    """Every row of a prompt dataset as a `Prompt`, in order; empty prompts are one-line errors."""
    column = config.prompt_column
    extra = [c for c in table.column_names if c != column]
    prompts = []
    for index, row in enumerate(table):
        raw = row[column]
        if isinstance(raw, str):
            text = raw
        elif is_conversation(raw):
            raw = [{"role": m["role"], "content": m["content"]} for m in raw]
            text = render(tokenizer, raw, generation_prompt=True)
        else:
            raise DataError(
                f"dataset {name}: row {index} of column '{column}' is {type(raw).__name__}, not a text or a list "
                "of {role, content} messages"
            )
        if not text.strip():
            raise DataError(f"dataset {name}: row {index} of column '{column}' is an empty prompt")
        prompts.append(Prompt(text, raw if isinstance(raw, list) else None, {c: row[c] for c in extra}))
    if not prompts:
        raise DataError(f"dataset {name} holds no prompts")
    return prompts


def split_prompts(
    prompts: list[Prompt], held_out: list[Prompt] | None, config: WarpConfig
) -> tuple[list, list, list[str]]:
    """(RL prompts, held-out prompts, why fewer than asked): after a seeded shuffle, `eval_prompts`
    held out (half the prompts at most), or `held_out` when another dataset gives them, then at
    most `rl_prompts` of the rest to train on. Each cut is said in words, never made silently."""
    order = list(range(len(prompts)))
    random.Random(config.seed).shuffle(order)
    why = []
    if held_out is None:
        if len(order) < 2:
            raise DataError(f"dataset {config.dataset} has {len(order)} prompt: too few to hold any out")
        n_eval = min(config.eval_prompts, len(order) // 2)
        if n_eval < config.eval_prompts:
            why.append(f"eval_prompts={config.eval_prompts} is more than half of the {len(order)} prompts")
        held_out, order = [prompts[i] for i in order[:n_eval]], order[n_eval:]
    if len(order) < config.rl_prompts:
        why.append(f"rl_prompts={config.rl_prompts} is more than the {len(order)} left to train on")
    return [prompts[i] for i in order[: config.rl_prompts]], held_out, why


def preference_pairs(table, config: WarpConfig, tokenizers: list, name: str) -> list[tuple[str, str]]:
    """(chosen, rejected) texts from TRL's preference format, as the reward model reads them."""
    missing = [c for c in ("chosen", "rejected") if c not in table.column_names]
    if missing:
        raise missing_column(
            f"dataset {name} has no column '{missing[0]}': preference pairs need chosen and rejected",
            missing,
            table.column_names,
        )
    explicit = "prompt" in table.column_names
    pairs = []
    for index, row in enumerate(table):
        texts = []
        for side in ("chosen", "rejected"):
            value, prompt = row[side], row["prompt"] if explicit else None
            if is_conversation(value):
                template = with_template(tokenizers)
                messages = ([*prompt] if is_conversation(prompt) else []) + list(value)
                texts.append(render(template, messages, generation_prompt=False))
            elif isinstance(value, str):
                texts.append((prompt if isinstance(prompt, str) else "") + value)
            else:
                raise DataError(f"dataset {name}: row {index} of column '{side}' is not a text or a conversation")
        pairs.append((texts[0], texts[1]))
    if len(pairs) < 2:
        raise DataError(f"dataset {name} has {len(pairs)} preference pair(s): too few to train and hold some out")
    return pairs


def split_pairs(pairs: list[tuple[str, str]], config: WarpConfig) -> tuple[list, list, list[str]]:
    """(train, held-out, why fewer than asked) pairs after a seeded shuffle: `reward_eval_pairs`
    held out (a tenth of them at most, 1 at least) and at most `reward_train_pairs` to train on."""
    order = list(range(len(pairs)))
    random.Random(config.seed).shuffle(order)
    n_eval = max(1, min(config.reward_eval_pairs, len(order) // 10))
    why = []
    if n_eval < config.reward_eval_pairs:
        why.append(f"reward_eval_pairs={config.reward_eval_pairs} is more than a tenth of the {len(order)} pairs")
    left = len(order) - n_eval
    if left < config.reward_train_pairs:
        why.append(f"reward_train_pairs={config.reward_train_pairs} is more than the {left} left to train on")
    return (
        [pairs[i] for i in order[n_eval : n_eval + config.reward_train_pairs]],
        [pairs[i] for i in order[:n_eval]],
        why,
    )
