"""Data → disjoint splits: reward-model pairs, RL prompts and held-out prompts.

Two kinds of `dataset`, told apart by their columns:

- **a prompt dataset** (TRL's prompt-only format): a `prompt_column` holding a text or a list of
  {role, content} messages (`prompts.py`); its other columns reach the reward functions;
- **reviews**: a text and a binary label column. Prompts are the first k policy tokens of a
  review, k uniform in [prompt_min_tokens, prompt_max_tokens]; a reward pair is (chosen = a
  positive review, rejected = a negative review), matched at random, each cut to
  k + max_new_tokens policy tokens, the shape of what the policy will write.

All splits are cut after a seeded shuffle and are disjoint.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from warp_rlhf.algorithm.reinforce import Prompt
from warp_rlhf.config import EMBEDDED, WarpConfig
from warp_rlhf.errors import DataError
from warp_rlhf.stages import assets
from warp_rlhf.stages.prompts import missing_column, preference_pairs, prompt_rows, split_pairs, split_prompts

_LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_POSITIVE = {1, "1", "pos", "positive"}
_NEGATIVE = {0, "0", "neg", "negative"}
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_BLANK = b" \t\r\n\xef\xbb\xbf"  # whitespace and a UTF-8 byte-order mark: what an empty text file holds
logger = logging.getLogger(__name__)


@dataclass
class Reviews:
    texts: list[str]
    labels: list[int]  # 1 positive, 0 negative


@dataclass
class Splits:
    reward_train: list[tuple[str, str]]  # (chosen, rejected) texts as the reward model reads them
    reward_eval: list[tuple[str, str]]
    rl_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    kind: str = "reviews"  # or "prompts": what `dataset` held
    cuts: str = ""  # why fewer prompts or pairs than asked were used; "" where none were

    def usage(self) -> str:
        """What the splits hold, in one line, with why it is fewer than asked where it is."""
        line = f"{_count(len(self.rl_prompts), 'prompt')} to train on, {len(self.eval_prompts)} held out"
        if self.reward_train:
            line += f"; {_count(len(self.reward_train), 'reward pair')} to train on, {len(self.reward_eval)} held out"
        return line + (f" ({self.cuts})" if self.cuts else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def clean(text: str) -> str:
    """Replace HTML line breaks (IMDB's raw `<br />`) and collapse whitespace."""
    return _SPACES.sub(" ", _BREAK.sub(" ", text)).strip()


def load_table(name: str, split: str):
    """A dataset as a `datasets.Dataset`: 'embedded' (IMDB), a local CSV / JSONL / Parquet file or
    folder, or a hub name; any failure is one `DataError` naming it and the cause (an empty file,
    the line that is not JSON, the parser's own words)."""
    files = _data_files(Path(name)) if name != EMBEDDED else []
    empty = next((path for path in files if _blank(path)), None)
    if empty is not None:
        raise DataError(f"dataset {name} is empty" if empty == Path(name) else f"dataset {name}: {empty} is empty")
    try:
        return _load_table(name, split)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types; the user needs one line
        problem = next((problem for path in files if (problem := _json_problem(path))), None)
        raise DataError(problem or f"dataset {name} cannot be loaded: {_reason(error)}") from None


def _load_table(name: str, split: str):
    from datasets import load_dataset

    if name == EMBEDDED:
        table = load_dataset("csv", data_files=str(assets.reviews_csv()), split="train")
        return table.filter(lambda source: source == "imdb", input_columns="source")
    path = Path(name)
    if path.is_file():
        kind = _LOCAL_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"dataset {path} has unknown format '{path.suffix}': use .csv, .jsonl, .json or .parquet")
        extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return load_dataset(kind, data_files=str(path), split="train", **extra)
    if path.is_dir():
        return load_dataset(str(path), split=split)
    if name.startswith((".", "/", "~")) or path.suffix.lower() in _LOCAL_FORMATS:
        raise DataError(f"dataset {name} does not exist")
    return load_dataset(name, split=split)


def _data_files(path: Path) -> list[Path]:
    """The local data files of a dataset path: the file itself, or a folder's files in a known format."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = (p for p in path.rglob("*") if p.suffix.lower() in _LOCAL_FORMATS and p.is_file())
        return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts))
    return []


def _blank(path: Path) -> bool:
    """Whether a file holds nothing but whitespace (and a byte-order mark): no header, no row."""
    with path.open("rb") as handle:
        return all(not chunk.strip(_BLANK) for chunk in iter(lambda: handle.read(1 << 16), b""))


def _json_problem(path: Path) -> str | None:
    """Where a JSON Lines file has a line that is not JSON (or a JSON file is not JSON), in words;
    None for other formats, or when it parses."""
    if _LOCAL_FORMATS.get(path.suffix.lower()) != "json":
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
        json.loads(text)
        return None  # one JSON document: datasets failed on its shape, which its own message says
    except UnicodeDecodeError:
        return None  # `_reason` names the byte
    except json.JSONDecodeError as whole:
        lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        for number, line in lines:
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                if path.suffix.lower() == ".json" and number == lines[0][0]:  # not JSON Lines: one document
                    return f"{path} is not JSON: {whole.msg} (line {whole.lineno}, column {whole.colno})"
                return f"line {number} of {path} is not JSON: {error.msg} (column {error.colno})"
        return None  # JSON Lines, every line JSON: datasets failed on their shape


def _binary(value) -> int:
    if isinstance(value, str):
        value = value.strip().lower()
    if value in _POSITIVE:
        return 1
    if value in _NEGATIVE:
        return 0
    raise DataError(f"label {value!r} is not binary: use 1/0, pos/neg or positive/negative")


def load_reviews(config: WarpConfig, table=None) -> Reviews:
    """Load, clean and de-duplicate the reviews; labels become 1 (positive) / 0 (negative)."""
    table = load_table(config.dataset, config.dataset_split) if table is None else table
    for column in (config.text_column, config.label_column):
        if column not in table.column_names:
            raise missing_column(f"dataset {config.dataset} has no column '{column}'", [column], table.column_names)
    texts, labels, seen = [], [], set()
    for text, label in zip(table[config.text_column], table[config.label_column], strict=True):
        if text is not None and not isinstance(text, str):
            raise DataError(
                f"dataset {config.dataset}: column '{config.text_column}' holds {type(text).__name__} values "
                f"({text!r}), not texts: set text_column to the column of review texts"
            )
        text = clean(text or "")
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(_binary(label))
    if not texts:
        raise DataError(f"dataset {config.dataset} holds no non-empty reviews")
    if len(set(labels)) < 2:
        raise DataError(f"dataset {config.dataset} has only one class (label {labels[0]}): need both")
    return Reviews(texts, labels)


def _reason(error: BaseException) -> str:
    """The cause of a loading error, in a few words: `datasets` wraps the real one in a generic
    `DatasetGenerationError`, so the first other error of the chain that says something is it."""
    from datasets.exceptions import DatasetGenerationError

    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    decoding = next((cause for cause in chain if isinstance(cause, UnicodeDecodeError)), None)
    if decoding is not None:
        byte = decoding.object[decoding.start : decoding.start + 1]
        return f"it is not UTF-8 text (byte {byte!r} at offset {decoding.start})"
    said = [c for c in chain if str(c).strip() and not isinstance(c, DatasetGenerationError)]
    reason = str(said[0]).strip().splitlines()[0] if said else type(error).__name__
    return "it holds no rows" if "corresponds to no data" in reason else reason


def first_tokens(texts: list[str], tokenizer, lengths: list[int]) -> list[str]:
    """The first `lengths[i]` tokens of each text, decoded back to a string."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(ids, lengths, strict=True)]


def split_reviews(reviews: Reviews, config: WarpConfig, tokenizer, *, pairs: bool = True) -> Splits:
    """Cut the disjoint splits; `tokenizer` is the policy's (prompt lengths are in its tokens).
    Without `pairs` (no reward model to train), every review may give a prompt."""
    rng = random.Random(config.seed)
    positive = [i for i, label in enumerate(reviews.labels) if label == 1]
    negative = [i for i, label in enumerate(reviews.labels) if label == 0]
    rng.shuffle(positive)
    rng.shuffle(negative)
    n_train, n_eval = (config.reward_train_pairs, config.reward_eval_pairs) if pairs else (0, 0)
    per_class = n_train + n_eval
    rest = positive[per_class:] + negative[per_class:]
    rng.shuffle(rest)
    n_prompts = config.rl_prompts + config.eval_prompts
    if min(len(positive), len(negative)) < per_class or len(rest) < n_prompts:
        raise DataError(
            f"dataset {config.dataset} has {len(positive)} positive and {len(negative)} negative reviews: "
            f"too few for {n_train}+{n_eval} pairs (each class) plus {n_prompts} prompts"
        )

    def prompt_lengths(n: int) -> list[int]:
        return [rng.randint(config.prompt_min_tokens, config.prompt_max_tokens) for _ in range(n)]

    def pairs(lo: int, hi: int) -> list[tuple[str, str]]:
        chosen = [reviews.texts[i] for i in positive[lo:hi]]
        rejected = [reviews.texts[i] for i in negative[lo:hi]]
        size = hi - lo
        chosen = first_tokens(chosen, tokenizer, [k + config.max_new_tokens for k in prompt_lengths(size)])
        rejected = first_tokens(rejected, tokenizer, [k + config.max_new_tokens for k in prompt_lengths(size)])
        return list(zip(chosen, rejected, strict=True))

    def prompts(indices: list[int]) -> list[Prompt]:
        texts = first_tokens([reviews.texts[i] for i in indices], tokenizer, prompt_lengths(len(indices)))
        return [Prompt(text) for text in texts]

    reward_train, reward_eval = pairs(0, n_train), pairs(n_train, per_class)
    usable = _with_tokens(rest, reviews.texts, tokenizer, config.prompt_min_tokens, n_prompts)
    if len(usable) < n_prompts:
        raise DataError(
            f"dataset {config.dataset}: only {len(usable)} of the reviews left for prompts have at least "
            f"prompt_min_tokens={config.prompt_min_tokens} tokens: too few for {n_prompts} prompts"
        )
    return Splits(
        reward_train=reward_train,
        reward_eval=reward_eval,
        rl_prompts=prompts(usable[: config.rl_prompts]),
        eval_prompts=prompts(usable[config.rl_prompts :]),
    )


def _with_tokens(indices: list[int], texts: list[str], tokenizer, least: int, wanted: int) -> list[int]:
    """The first `wanted` of `indices`, in order, whose texts have at least `least` tokens (a prompt
    is cut from a review's first tokens, so a shorter review cannot give one of `least`)."""
    kept: list[int] = []
    for start in range(0, len(indices), 512):
        chunk = indices[start : start + 512]
        counts = [len(ids) for ids in tokenizer([texts[i] for i in chunk], add_special_tokens=False)["input_ids"]]
        kept += [i for i, count in zip(chunk, counts, strict=True) if count >= least]
        if len(kept) >= wanted:
            return kept[:wanted]
    return kept


def make_splits(config: WarpConfig, tokenizers: list, *, pairs: bool, window: int | None = None) -> Splits:
    """The run's splits from `dataset` (and `eval_dataset`, `reward_dataset` when given). `tokenizers`:
    any whose chat template renders preference conversations first, the policy's last. `window`:
    the policy's context, which every prompt and `max_new_tokens` must fit."""
    policy_tokenizer = tokenizers[-1]
    table = load_table(config.dataset, config.dataset_split)
    columns = table.column_names
    if config.prompt_column in columns:
        prompts = prompt_rows(table, config, policy_tokenizer, config.dataset)
        held_out, cuts = _held_out(config, policy_tokenizer)
        rl, held_out, split_cuts = split_prompts(prompts, held_out, config)
        cuts += split_cuts
        splits = Splits([], [], rl, held_out, kind="prompts")
        _check_lengths(rl + held_out, policy_tokenizer, config, window)
    elif config.text_column in columns or config.label_column in columns:  # reviews; `load_reviews` names a gap
        splits = split_reviews(load_reviews(config, table), config, policy_tokenizer, pairs=pairs)
        held_out, cuts = _held_out(config, policy_tokenizer)
        if held_out is not None:
            splits.eval_prompts = held_out
    else:
        raise missing_column(
            f"dataset {config.dataset} has neither a '{config.prompt_column}' column (prompts) nor "
            f"'{config.text_column}' and '{config.label_column}' columns (reviews)",
            [config.prompt_column, config.text_column, config.label_column],
            columns,
        )
    if pairs and (config.reward_dataset or splits.kind == "prompts"):
        source = table
        if config.reward_dataset:
            source = load_table(config.reward_dataset, config.dataset_split)
        elif not {"chosen", "rejected"} <= set(columns):
            raise DataError(
                f"dataset {config.dataset} holds prompts but no preference pairs to train the reward model on: "
                "give reward_funcs, or a reward_dataset with chosen and rejected columns"
            )
        name = config.reward_dataset or config.dataset
        splits.reward_train, splits.reward_eval, pair_cuts = split_pairs(
            preference_pairs(source, config, tokenizers, name), config
        )
        cuts += pair_cuts
    splits.cuts = "; ".join(cuts)
    if len(splits.rl_prompts) < 2:
        raise DataError(f"dataset {config.dataset}: {splits.usage()}: at least 2 prompts are needed to train on")
    if cuts:
        logger.warning(splits.usage())  # said before any training: no part of the data is left out silently
    return splits


def _check_lengths(prompts: list[Prompt], tokenizer, config: WarpConfig, window: int | None) -> None:
    if window is None:
        return
    room = window - config.max_new_tokens
    lengths = [len(ids) + 1 for ids in tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]]
    longer = sum(length > room for length in lengths)
    if longer:
        raise DataError(
            f"dataset {config.dataset}: {longer} prompt(s) have more than the {room} tokens that the policy's context "
            f"({window}) leaves after max_new_tokens ({config.max_new_tokens}): shorten them or lower max_new_tokens"
        )


def _held_out(config: WarpConfig, tokenizer) -> tuple[list[Prompt] | None, list[str]]:
    """The held-out prompts of `eval_dataset` (or of `eval_split` of `dataset`), when one is given:
    its first `eval_prompts`, and why they are fewer where they are."""
    if config.eval_dataset is None and config.eval_split is None:
        return None, []
    name = config.eval_dataset or config.dataset
    table = load_table(name, config.eval_split or config.dataset_split)
    if config.prompt_column not in table.column_names:
        raise missing_column(
            f"eval dataset {name} has no column '{config.prompt_column}' of prompts",
            [config.prompt_column],
            table.column_names,
        )
    prompts = prompt_rows(table, config, tokenizer, name)
    why = [f"{name} has {len(prompts)} held-out prompts, fewer than eval_prompts={config.eval_prompts}"]
    return prompts[: config.eval_prompts], why if len(prompts) < config.eval_prompts else []


def read_splits(data: dict) -> Splits:
    """`Splits` from `data/splits.json` (prompts saved as plain texts by earlier versions too)."""
    prompts = {
        k: [Prompt(**p) if isinstance(p, dict) else Prompt(p) for p in data[k]] for k in ("rl_prompts", "eval_prompts")
    }
    pairs = {k: [tuple(p) for p in data[k]] for k in ("reward_train", "reward_eval")}
    return Splits(**pairs, **prompts, kind=data.get("kind", "reviews"), cuts=data.get("cuts", ""))
