import dataclasses
import json
import re
import shutil

import pytest

from tests.helpers import NEGATIVE_WORDS, POSITIVE_WORDS, make_tokenizer, write_reviews_csv
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import DataError
from warp_rlhf.stages.data import clean, load_reviews, load_table, make_splits, split_reviews

SIZES = dict(reward_train_pairs=60, reward_eval_pairs=20, rl_prompts=50, eval_prompts=30)


def config_for(path, **extra) -> WarpConfig:
    return WarpConfig(dataset=str(path), **(SIZES | dict(max_new_tokens=4) | extra))


def polarity(text: str) -> set[int]:
    words = set(text.split())
    return {label for label, vocab in ((1, POSITIVE_WORDS), (0, NEGATIVE_WORDS)) if words & set(vocab)}


def test_clean_removes_html_breaks_and_extra_space():
    assert clean("Great film.<br /><br />Loved it.<BR>  Really ") == "Great film. Loved it. Really"


def test_csv_loads_through_datasets_with_clean_binary_labels(reviews_csv):
    reviews = load_reviews(config_for(reviews_csv))
    assert len(reviews.texts) == len(reviews.labels) > 300  # duplicates dropped, most kept
    assert set(reviews.labels) == {0, 1}
    assert not any("<br" in text for text in reviews.texts)
    assert len(set(reviews.texts)) == len(reviews.texts)


def test_splits_are_sized_and_deterministic(reviews_csv):
    config = config_for(reviews_csv)
    reviews = load_reviews(config)
    splits = split_reviews(reviews, config, make_tokenizer())
    assert (len(splits.reward_train), len(splits.reward_eval)) == (60, 20)
    assert (len(splits.rl_prompts), len(splits.eval_prompts)) == (50, 30)
    assert split_reviews(reviews, config, make_tokenizer()) == splits
    other = split_reviews(reviews, config_for(reviews_csv, seed=1), make_tokenizer())
    assert other.reward_train != splits.reward_train


def test_splits_are_disjoint_by_row(reviews_csv):
    """With unique row markers, every split draws on different rows."""
    config = config_for(reviews_csv, prompt_min_tokens=1, prompt_max_tokens=1)
    reviews = load_reviews(config)
    marked = type(reviews)([f"row{i} {t}" for i, t in enumerate(reviews.texts)], reviews.labels)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([f"row{i}" for i in range(len(marked.texts))])
    splits = split_reviews(marked, config, tokenizer)
    rows = {
        "reward_train": {t.split()[0] for pair in splits.reward_train for t in pair},
        "reward_eval": {t.split()[0] for pair in splits.reward_eval for t in pair},
        "rl_prompts": {p.text.split()[0] for p in splits.rl_prompts},
        "eval_prompts": {p.text.split()[0] for p in splits.eval_prompts},
    }
    assert [len(r) for r in rows.values()] == [120, 40, 50, 30]
    for a in rows:
        for b in rows:
            assert a == b or not rows[a] & rows[b], (a, b)


def test_pairs_are_chosen_positive_rejected_negative(reviews_csv):
    config = config_for(reviews_csv, max_new_tokens=12)
    splits = split_reviews(load_reviews(config), config, make_tokenizer())
    for chosen, rejected in splits.reward_train + splits.reward_eval:
        assert polarity(chosen) <= {1} and polarity(rejected) <= {0}
    assert sum(polarity(c) == {1} for c, _ in splits.reward_train) > 40


def test_prompts_have_the_configured_token_range(reviews_csv):
    config = config_for(reviews_csv, prompt_min_tokens=2, prompt_max_tokens=4)
    tokenizer = make_tokenizer()
    splits = split_reviews(load_reviews(config), config, tokenizer)
    lengths = {len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in splits.eval_prompts}
    assert lengths <= {2, 3, 4} and len(lengths) > 1


def test_reward_texts_are_cut_to_prompt_plus_completion_length(reviews_csv):
    config = config_for(reviews_csv, prompt_min_tokens=2, prompt_max_tokens=3, max_new_tokens=4)
    tokenizer = make_tokenizer()
    splits = split_reviews(load_reviews(config), config, tokenizer)
    lengths = {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for pair in splits.reward_train for t in pair}
    assert lengths <= {6, 7}


def test_jsonl_and_parquet_and_string_labels(tmp_path):
    from datasets import Dataset

    rows = [
        {"review": f"the movie was {'good' if i % 2 else 'bad'} {i}", "sentiment": "pos" if i % 2 else "neg"}
        for i in range(20)
    ]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    for path in (jsonl, tmp_path / "r.parquet"):
        reviews = load_reviews(WarpConfig(dataset=str(path), text_column="review", label_column="sentiment"))
        assert reviews.labels == [i % 2 for i in range(20)]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (dict(text_column="review"), "has no column 'review' (columns: text, label)"),
        (dict(labels=(2, 0)), "label 2 is not binary"),
        (dict(labels=(1, 1)), "has only one class"),
        (dict(dataset="missing.csv"), "does not exist"),
        (dict(rl_prompts=10_000), "too few for"),
    ],
)
def test_bad_data_is_one_clear_error(tmp_path, setup, message):
    path = write_reviews_csv(tmp_path / "r.csv", 100, labels=setup.pop("labels", (1, 0)))
    dataset = str(tmp_path / setup.pop("dataset")) if "dataset" in setup else str(path)
    config = WarpConfig(
        dataset=dataset, **(dict(reward_train_pairs=10, reward_eval_pairs=5, rl_prompts=5, eval_prompts=5) | setup)
    )
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        split_reviews(load_reviews(config), config, make_tokenizer())
    assert "\n" not in str(error.value)


def test_empty_csv_is_an_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError):
        load_reviews(WarpConfig(dataset=str(path)))


def test_a_text_column_of_numbers_is_named_in_one_line(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("text,label\n5,1\n7,0\n")
    with pytest.raises(DataError, match="column 'text' holds int values \\(5\\), not texts"):
        load_reviews(WarpConfig(dataset=str(path)))


def test_a_file_that_is_not_utf8_is_named_with_the_cause(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9 was good,1\nbad,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.csv cannot be loaded: it is not UTF-8 text \\(byte b'\\\\xe9'"):
        load_reviews(WarpConfig(dataset=str(path)))


def test_prompts_have_at_least_prompt_min_tokens_and_short_reviews_give_none(tmp_path):
    path = write_reviews_csv(tmp_path / "r.csv", 400)
    with open(path, "a") as handle:  # reviews of one and two tokens: too short for a 3-token prompt
        handle.writelines(f"{f'w{i}' if i % 2 else f'w{i} x{i}'},{i % 2}\n" for i in range(40))
    config = config_for(path, prompt_min_tokens=3, prompt_max_tokens=4, rl_prompts=60, eval_prompts=40)
    splits = split_reviews(load_reviews(config), config, make_tokenizer())
    lengths = [len(make_tokenizer()(p.text, add_special_tokens=False)["input_ids"]) for p in splits.rl_prompts]
    assert min(lengths) >= 3 and len(splits.rl_prompts) == 60 and len(splits.eval_prompts) == 40


def test_too_few_reviews_long_enough_for_prompts_is_one_line(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("text,label\n" + "".join(f"word{i} {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(200)))
    config = config_for(path, prompt_min_tokens=3, prompt_max_tokens=4, reward_train_pairs=10, reward_eval_pairs=5)
    with pytest.raises(DataError, match="have at least prompt_min_tokens=3 tokens: too few for 80 prompts"):
        split_reviews(load_reviews(config), config, make_tokenizer())


EMPTY = {
    "a 0-byte CSV": ("r.csv", b""),
    "a 0-byte JSONL": ("r.jsonl", b""),
    "a 0-byte JSON": ("r.json", b""),
    "a 0-byte Parquet": ("r.parquet", b""),
    "a JSONL of blank lines": ("r.jsonl", b"\n \n\r\n"),
    "a CSV of a byte-order mark": ("r.csv", b"\xef\xbb\xbf\n"),
}


@pytest.mark.parametrize(("name", "content"), EMPTY.values(), ids=EMPTY.keys())
def test_an_empty_file_is_named_as_empty(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"^dataset {tmp_path / name} is empty$"):
        load_table(str(tmp_path / name), "train")


def test_an_empty_eval_dataset_or_file_in_a_folder_is_named_as_empty(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the movie {i}"}) + "\n" for i in range(20)))
    (tmp_path / "held_out.jsonl").write_bytes(b"")
    config = WarpConfig(dataset=str(prompts), eval_dataset=str(tmp_path / "held_out.jsonl"), max_new_tokens=4)
    with pytest.raises(DataError, match=f"^dataset {tmp_path / 'held_out.jsonl'} is empty$"):
        make_splits(config, [make_tokenizer()], pairs=False)
    (tmp_path / "folder").mkdir()
    shutil.copy(prompts, tmp_path / "folder" / "train.jsonl")
    (tmp_path / "folder" / "more.csv").write_bytes(b"")
    with pytest.raises(DataError, match=f"^dataset {tmp_path / 'folder'}: {tmp_path / 'folder' / 'more.csv'} is empty"):
        load_table(str(tmp_path / "folder"), "train")


NOT_PARSED = {
    "a JSONL line": ("r.jsonl", '{"prompt": "a"}\n\n{"prompt": oops}\n{"prompt": "b"}\n',
                     "^line 3 of {path} is not JSON: Expecting value \\(column 12\\)$"),
    "a JSONL line with a trailing comma": ("r.jsonl", '{"prompt": "a"},\n',
                                           "^line 1 of {path} is not JSON: Extra data"),
    "a JSON array": ("r.json", '[\n  {"prompt": "a"},\n  {"prompt": }\n]\n',
                     "^{path} is not JSON: Expecting value \\(line 3, column 14\\)$"),
    "a JSON Lines file named .json": ("r.json", '{"prompt": "a"}\n{"prompt" "b"}\n',
                                      "^line 2 of {path} is not JSON: Expecting ':' delimiter"),
    "a CSV row": ("r.csv", "prompt,topic\na,b\nc,d,e\n",
                  "^dataset {path} cannot be loaded: Error tokenizing data. C error: Expected 2 fields in line 3"),
}  # fmt: skip


@pytest.mark.parametrize(("name", "content", "message"), NOT_PARSED.values(), ids=NOT_PARSED.keys())
def test_a_file_that_does_not_parse_says_where(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message.format(path=re.escape(str(path)))):
        load_table(str(path), "train")


def test_a_column_name_with_a_byte_order_mark_is_shown_as_it_is(tmp_path):
    """A CSV saved with a byte-order mark twice (datasets drops the first): the column is '\\ufeffprompt'."""
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeff\ufeffprompt,topic\n".encode() + b"".join(b"the movie,good\n" for _ in range(10)))
    with pytest.raises(DataError) as error:
        make_splits(WarpConfig(dataset=str(path)), [make_tokenizer()], pairs=False)
    assert str(error.value) == (
        f"dataset {path} has neither a 'prompt' column (prompts) nor 'text' and 'label' columns (reviews) "
        "(columns: '\\ufeffprompt', topic); '\\ufeffprompt' starts with a byte-order mark (U+FEFF, which Excel "
        "writes at the start of a UTF-8 file): save the file as UTF-8 without BOM, or rename the column"
    )
    spaced = write_reviews_csv(tmp_path / "spaced.csv", 20)
    spaced.write_text(spaced.read_text().replace("text,label", " text,label", 1))
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: ' text', label\); ' text' has spaces"):
        load_reviews(WarpConfig(dataset=str(spaced)))


def prompt_file(path, n: int):
    path.write_text("".join(json.dumps({"prompt": f"the movie {i}"}) + "\n" for i in range(n)))
    return path


def test_a_prompt_file_smaller_than_asked_is_cut_in_half_and_says_so(tmp_path, monkeypatch):
    """120 prompts, eval_prompts 200 and rl_prompts 2000 (the defaults): 60 held out, 60 trained on,
    and one line says so, and why, before any training."""
    from warp_rlhf.stages import data

    said = []
    monkeypatch.setattr(data.logger, "warning", said.append)
    config = WarpConfig(dataset=str(prompt_file(tmp_path / "p.jsonl", 120)), max_new_tokens=4)
    splits = make_splits(config, [make_tokenizer()], pairs=False)
    assert (len(splits.rl_prompts), len(splits.eval_prompts)) == (60, 60)
    assert said == [
        "60 prompts to train on, 60 held out (eval_prompts=200 is more than half of the 120 prompts; "
        "rl_prompts=2000 is more than the 60 left to train on)"
    ]
    assert data.read_splits(json.loads(json.dumps(dataclasses.asdict(splits)))).usage() == said[0]


def test_splits_as_asked_are_not_announced(tmp_path, monkeypatch):
    from warp_rlhf.stages import data

    said = []
    monkeypatch.setattr(data.logger, "warning", said.append)
    config = WarpConfig(dataset=str(prompt_file(tmp_path / "p.jsonl", 40)), rl_prompts=20, eval_prompts=10)
    splits = make_splits(config, [make_tokenizer()], pairs=False)
    assert said == [] and splits.usage() == "20 prompts to train on, 10 held out"


def test_a_short_held_out_dataset_is_named(tmp_path, monkeypatch):
    from warp_rlhf.stages import data

    said = []
    monkeypatch.setattr(data.logger, "warning", said.append)
    held_out = prompt_file(tmp_path / "held.jsonl", 5)
    config = WarpConfig(dataset=str(prompt_file(tmp_path / "p.jsonl", 40)), eval_dataset=str(held_out), rl_prompts=30)
    splits = make_splits(config, [make_tokenizer()], pairs=False)
    assert (len(splits.rl_prompts), len(splits.eval_prompts)) == (30, 5)
    why = f"{held_out} has 5 held-out prompts, fewer than eval_prompts=200"
    assert said == [f"30 prompts to train on, 5 held out ({why})"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda path: dict(dataset=str(prompt_file(path / "p.jsonl", 2))),
         "1 prompt to train on, 1 held out (eval_prompts=200 is more than half of the 2 prompts; rl_prompts=2000 "
         "is more than the 1 left to train on): at least 2 prompts are needed to train on"),
        (lambda path: dict(dataset=str(write_reviews_csv(path / "r.csv", 100)), rl_prompts=1, eval_prompts=5,
                           reward_train_pairs=10, reward_eval_pairs=5),
         "1 prompt to train on, 5 held out; 10 reward pairs to train on, 5 held out: at least 2 prompts are needed"),
    ],
    ids=["a file of two prompts", "rl_prompts 1"],
)  # fmt: skip
def test_fewer_than_two_prompts_to_train_on_is_refused(tmp_path, setup, message):
    config = WarpConfig(max_new_tokens=4, **setup(tmp_path))
    with pytest.raises(DataError, match=re.escape(message)) as error:
        make_splits(config, [make_tokenizer()], pairs=config.dataset.endswith(".csv"))
    assert "\n" not in str(error.value)
