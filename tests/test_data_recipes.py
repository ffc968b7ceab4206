"""Built-in tasks, SFT mixes and user-file loading (data_recipes/)."""

import json
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_recipes import DataError, build_sft_mix, heldout_sets, load_messages_file
from data_recipes.tasks import (
    TASKS,
    WORDS,
    arithmetic_examples,
    retrieval_examples,
    safety_examples,
    tokenizer_corpus,
)
from rewards.verifiers import verify

COLUMNS = ["messages", "task", "answer", "harmful", "n_pairs"]
KWARGS = {"arithmetic": {}, "retrieval": {"n_pairs": (4, 16)}, "safety": {}}


def _question(row):
    return row["messages"][0]["content"]


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_under_seed(task):
    fn = TASKS[task]
    assert fn(50, seed=3, **KWARGS[task]) == fn(50, seed=3, **KWARGS[task])
    assert fn(50, seed=3, **KWARGS[task]) != fn(50, seed=4, **KWARGS[task])


@pytest.mark.parametrize("task", TASKS)
def test_schema_is_shared(task):
    for split in ("train", "heldout"):
        for row in TASKS[task](20, seed=0, split=split, **KWARGS[task]):
            assert list(row) == COLUMNS
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert row["task"] == task and isinstance(row["answer"], str)
            assert isinstance(row["harmful"], bool) and isinstance(row["n_pairs"], int)
    mix = [row for t in TASKS for row in TASKS[t](5, seed=0, **KWARGS[t])]
    assert datasets.Dataset.from_list(mix).column_names == COLUMNS


def test_arithmetic_splits_are_disjoint():
    def problems(split):
        rows = arithmetic_examples(3000, seed=0, split=split)
        return {re.sub(r"\s*=.*", "", row["messages"][1]["content"]) for row in rows}

    train, heldout = problems("train"), problems("heldout")
    assert train and heldout and not train & heldout


def test_arithmetic_answers_are_right_and_short():
    for row in arithmetic_examples(300, seed=1, max_operand=50):
        a, op, b = re.match(r"(\d+) ([+-]) (\d+) =", row["messages"][1]["content"]).groups()
        assert max(int(a), int(b)) <= 50
        result = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert result >= 0 and row["answer"] == str(result)
        assert f"{a} {op} {b}" in _question(row)
        assert len(row["messages"][1]["content"]) <= 20


def test_safety_splits_are_disjoint_and_balanced():
    train = safety_examples(2000, seed=0)
    heldout = safety_examples(300, seed=0, split="heldout")
    assert not {_question(r) for r in train} & {_question(r) for r in heldout}
    for rows in (train, heldout):
        share = sum(r["harmful"] for r in rows) / len(rows)
        assert 0.4 < share < 0.6
    assert "How do I kill a Python process?" in {_question(r) for r in train + heldout}


def test_retrieval_answer_is_the_queried_value():
    positions = set()
    for row in retrieval_examples(300, seed=0, n_pairs=(3, 12)):
        text = _question(row)
        pairs = dict(re.findall(r"(\w+) = (\w+)", text))
        key = re.search(r"value of (\w+)\?$", text).group(1)
        assert len(pairs) == row["n_pairs"] and 3 <= row["n_pairs"] <= 12
        assert set(pairs) <= set(WORDS) and set(pairs.values()) <= set(WORDS)
        assert not set(pairs) & set(pairs.values())
        assert len(set(pairs.values())) == len(pairs)  # distinct values: the answer is unambiguous
        assert row["answer"] == pairs[key]
        assert row["messages"][1]["content"] == f"Answer: {key} = {row['answer']}"
        positions.add(list(pairs).index(key) / row["n_pairs"])
    assert min(positions) == 0 and max(positions) > 0.9  # queried key anywhere, first to last


def test_retrieval_n_pairs_and_streams():
    assert {r["n_pairs"] for r in retrieval_examples(20, seed=0, n_pairs=32)} == {32}
    assert {r["n_pairs"] for r in retrieval_examples(200, seed=0, n_pairs=[4, 6])} == {4, 5, 6}
    assert retrieval_examples(5, 0, 8) != retrieval_examples(5, 0, 8, split="heldout")
    with pytest.raises(ValueError, match="n_pairs"):
        retrieval_examples(1, 0, n_pairs=len(WORDS) // 2 + 1)
    assert len(WORDS) >= 200 and len(set(WORDS)) == len(WORDS)


@pytest.mark.parametrize("task", TASKS)
def test_verifiers_accept_references_and_reject_wrong(task):
    for split in ("train", "heldout"):
        for row in TASKS[task](200, seed=0, split=split, **KWARGS[task]):
            assert verify(row, row["answer"]) and verify(row, row["messages"][1]["content"])
            if task == "safety":
                wrong = "Sure, here is how." if row["harmful"] else "I can't help with that."
            elif task == "retrieval":
                wrong = row["messages"][1]["content"] + "s"  # another word
            else:
                wrong = str(int(row["answer"]) + 1).zfill(len(row["answer"]))
            assert not verify(row, wrong)


def test_tokenizer_corpus_covers_tasks():
    text = "\n".join(tokenizer_corpus(seed=0))
    assert all(word in text for word in WORDS)
    assert "pipe bomb" in text and "Python process" in text and "What is the value of" in text


def test_build_sft_mix(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}], "source": "me"}) + "\n")
    spec = {"arithmetic": {"n": 30}, "retrieval": {"n": 10, "n_pairs": [4, 8]}, "safety": {"n": 20}}
    mix = build_sft_mix(spec, [str(path)], seed=0)
    assert len(mix) == 61 and set(COLUMNS) <= set(mix.column_names) and "source" in mix.column_names
    assert sorted(set(mix["task"])) == ["arithmetic", "retrieval", "safety", "user"]
    assert mix["task"][:10] != sorted(mix["task"][:10]) or len(set(mix["task"][:10])) > 1  # shuffled
    assert mix.to_list() == build_sft_mix(spec, [str(path)], seed=0).to_list()
    with pytest.raises(ValueError, match=r"'poetry'.*arithmetic, retrieval, safety"):
        build_sft_mix({"poetry": {"n": 1}}, [], seed=0)


def test_heldout_sets():
    sets = heldout_sets({"arithmetic": {"task": "arithmetic", "n": 10},
                         "retrieval@32": {"task": "retrieval", "n": 5, "n_pairs": 32}}, seed=0)
    assert len(sets["arithmetic"]) == 10 and {r["n_pairs"] for r in sets["retrieval@32"]} == {32}
    assert sets["arithmetic"] == arithmetic_examples(10, seed=0, split="heldout")


# --- user files -------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}], "task": "arithmetic", "answer": "4"}


def _jsonl(tmp_path, lines, name="x.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_load_good_jsonl_and_parquet(tmp_path):
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "source": "forum"}
    ds = load_messages_file(_jsonl(tmp_path, [GOOD, plain]))
    assert len(ds) == 2 and ds[0]["messages"] == GOOD["messages"]
    assert ds[1]["task"] == "user" and ds[1]["answer"] == "" and ds[1]["harmful"] is False and ds[1]["n_pairs"] == 0
    assert ds[1]["source"] == "forum" and ds[0]["source"] is None  # extra columns kept

    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD]), path)
    ds = load_messages_file(path)
    assert len(ds) == 2 and ds[1]["messages"] == GOOD["messages"] and ds[1]["task"] == "arithmetic"

    array = tmp_path / "y.json"
    array.write_text(json.dumps([GOOD]))
    assert load_messages_file(array)[0]["answer"] == "4"


def _with_messages(messages):
    return {"messages": messages}


BAD = {
    "bad role": (_with_messages([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]),
                 "messages[1].role is 'bot'; expected one of system, user, assistant"),
    "missing content": (_with_messages([{"role": "user", "content": "a"}, {"role": "assistant"}]),
                        "messages[1].content is missing"),
    "non-list messages": (_with_messages("hello"), "messages is str; expected a non-empty list"),
    "empty messages": (_with_messages([]), "messages is an empty list"),
    "no assistant turn": (_with_messages([{"role": "user", "content": "a"}]), "messages has no assistant turn"),
    "last turn not assistant": (
        _with_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}]), "messages[2].role is 'user'; the last turn"),
    "no messages": ({"text": "hello"}, "messages is missing"),
    "bad answer type": ({**GOOD, "answer": 4}, "answer is int; expected str"),
    "broken json": ('{"messages": [', "invalid JSON"),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_jsonl_names_file_row_and_field(tmp_path, case):
    bad, expected = BAD[case]
    path = _jsonl(tmp_path, [GOOD, GOOD, bad, GOOD], name="data.jsonl")
    with pytest.raises(DataError) as err:
        load_messages_file(path)
    assert str(path) in str(err.value) and " row 3: " in str(err.value) and expected in str(err.value)


def test_malformed_parquet_row(tmp_path):
    path = tmp_path / "bad.parquet"
    rows = [GOOD, {**GOOD, "messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"bad\.parquet row 2: messages\[1\]\.role is 'bot'"):
        load_messages_file(path)


def test_missing_file_and_blank_lines(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_messages_file(tmp_path / "nope.jsonl")
    path = _jsonl(tmp_path, [GOOD, "", "  ", {"messages": "x"}])  # row = line number, blank lines included
    with pytest.raises(DataError, match=" row 4: "):
        load_messages_file(path)
    assert issubclass(DataError, ValueError)
