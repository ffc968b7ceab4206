"""Built-in tasks, SFT mixes and user-file loading (data_recipes/)."""

import json
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignment.config import ConfigError
from data_recipes.preferences import CATEGORY
from data_recipes import (PREFERENCE_BUILDERS, DataError, build_preferences, build_sft_mix, chat_length, check_builtin,
                          drop_too_long, heldout_sets, load_messages_file, load_preference_file, prompt_of)
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
    with pytest.raises(ConfigError, match=r"'builtin\.poetry' is not a built-in task.*arithmetic, retrieval, safety"):
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
    "tool call on a user turn": (
        _with_messages([{"role": "user", "content": "a", "tool_calls": [{"function": {"name": "f"}}]},
                        {"role": "assistant", "content": "b"}]), "messages[0].tool_calls: only assistant messages"),
    "tool call without a name": (
        _with_messages([{"role": "user", "content": "a"},
                        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]},
                        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "b"}]),
        "messages[1].tool_calls[0].function.name is missing"),
    "tool arguments not JSON": (
        _with_messages([{"role": "user", "content": "a"},
                        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]},
                        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "b"}]),
        "messages[1].tool_calls[0].function.arguments is not valid JSON"),
    "tool result not a string": (
        _with_messages([{"role": "user", "content": "a"}, {"role": "tool", "content": {"t": 1}},
                        {"role": "assistant", "content": "b"}]), "messages[1].content is dict; expected a string"),
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


def test_non_utf8_bytes_name_file_row_and_offset(tmp_path):
    lines = [json.dumps(GOOD), json.dumps(GOOD), '{"messages": [{"role": "user", "content": "caf\xe9"}]}']
    path = tmp_path / "latin1.jsonl"
    path.write_bytes("\n".join(lines).encode("latin-1"))
    column = lines[2].index("\xe9") + 1
    offset = len(lines[0]) + len(lines[1]) + 2 + column - 1
    message = f"{path} row 3: not valid UTF-8: byte 0xe9 at column {column} (byte offset {offset} in the file"
    with pytest.raises(DataError) as err:
        load_messages_file(path)
    assert message in str(err.value)
    with pytest.raises(DataError) as err:  # preference files are read the same way
        load_preference_file(path)
    assert message in str(err.value)

    array = tmp_path / "latin1.json"
    array.write_bytes(b'[\n  {"messages": []},\n  {"prompt": "na\xefve"}\n]')  # 0xef: byte 38, line 3 column 17
    with pytest.raises(DataError, match=r"latin1\.json line 3: not valid UTF-8: byte 0xef at column 17 "
                                        r"\(byte offset 38 in the file"):
        load_messages_file(array)


def test_jsonl_rows_split_at_newlines_only(tmp_path):
    """U+2028 / U+0085 may appear raw inside JSON strings: they do not end a row (str.splitlines would split)."""
    odd = {"messages": [{"role": "user", "content": "a\u2028b\x85c"}, {"role": "assistant", "content": "d"}]}
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(odd, ensure_ascii=False) + "\r\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    ds = load_messages_file(path)
    assert len(ds) == 2 and ds[0]["messages"][0]["content"] == "a\u2028b\x85c"


# --- built-in data specs ----------------------------------------------------------------------------------------

SPEC_ERRORS = {
    "not a mapping": (["arithmetic"], {}, "sft.yaml: 'data.builtin' must be a mapping of task -> options"),
    "options not a mapping": ({"arithmetic": 100}, {}, "sft.yaml: 'data.builtin.arithmetic' must be a mapping of "
                                                       "options, e.g. {n: 100}; got int"),
    "options missing": ({"safety": None}, {}, "'data.builtin.safety' must be a mapping of options, e.g. {n: 100}; "
                                              "got nothing"),
    "unknown task": ({"arithmetc": {"n": 5}}, {}, "sft.yaml: 'data.builtin.arithmetc' is not a built-in task (did you "
                                                  "mean 'arithmetic'?); valid tasks: arithmetic, retrieval, safety"),
    "unknown option": ({"arithmetic": {"n": 5, "max_opernd": 9}}, {},
                       "sft.yaml: 'data.builtin.arithmetic.max_opernd' is not an option of task 'arithmetic' (did you "
                       "mean 'max_operand'?); valid options: max_operand, n, seed"),
    "split is not an option": ({"safety": {"n": 5, "split": "heldout"}}, {},
                               "sft.yaml: 'data.builtin.safety.split' cannot be set"),
    "missing option": ({"retrieval": {"n": 5}}, {}, "sft.yaml: 'data.builtin.retrieval.n_pairs' is missing (task "
                                                    "'retrieval' requires n, n_pairs)"),
    "wrong type": ({"arithmetic": {"n": "ten"}}, {}, "sft.yaml: 'data.builtin.arithmetic.n' = 'ten' must be int, "
                                                     "got str"),
    "bool is not int": ({"arithmetic": {"n": 5, "max_operand": True}}, {},
                        "'data.builtin.arithmetic.max_operand' = True must be int, got bool"),
    "wrong seed type": ({"safety": {"n": 5, "seed": 1.5}}, {}, "'data.builtin.safety.seed' = 1.5 must be int"),
    "bad n_pairs item": ({"retrieval": {"n": 5, "n_pairs": [1, "four"]}}, {},
                         "'data.builtin.retrieval.n_pairs' = [1, 'four'] does not match any of int, list"),
    "set: unknown implicit task": ({"arithmetic@3": {"n": 5}}, {"named_sets": True},
                                   "sft.yaml: 'data.builtin.arithmetic@3' is not a built-in task (did you mean "
                                   "'arithmetic'?); valid tasks: arithmetic, retrieval, safety; a set named otherwise "
                                   "needs a 'task' option"),
    "set: unknown task": ({"r@8": {"task": "retrival", "n": 5, "n_pairs": 8}}, {"named_sets": True},
                          "sft.yaml: 'data.builtin.r@8.task' = 'retrival' is not a built-in task (did you mean "
                          "'retrieval'?)"),
    "set: task not a string": ({"r@8": {"task": 3, "n": 5}}, {"named_sets": True},
                               "sft.yaml: 'data.builtin.r@8.task' must be a task name, got int"),
    "set: option of its task": ({"r@8": {"task": "retrieval", "n": 5, "n_pair": 8}}, {"named_sets": True},
                                "'data.builtin.r@8.n_pair' is not an option of task 'retrieval' (did you mean "
                                "'n_pairs'?); valid options: n, n_pairs, seed, task"),
    "set: missing option": ({"r@8": {"task": "retrieval", "n_pairs": 8}}, {"named_sets": True},
                            "'data.builtin.r@8.n' is missing"),
}


@pytest.mark.parametrize("case", SPEC_ERRORS)
def test_check_builtin_names_file_and_key(case):
    spec, kwargs, expected = SPEC_ERRORS[case]
    with pytest.raises(ConfigError) as err:
        check_builtin(spec, TASKS, "sft.yaml", "data.builtin", **kwargs)
    assert expected in str(err.value)


def test_check_builtin_accepts_valid_specs():
    check_builtin({"arithmetic": {"n": 16000, "max_operand": 20}, "retrieval": {"n": 1500, "n_pairs": [1, 4]},
                   "safety": {"n": 10, "seed": 3}}, TASKS, "sft.yaml", "data.builtin")
    check_builtin({"retrieval": {"n": 5, "n_pairs": (2, 3)}}, TASKS, "x", "k")  # a tuple from Python code
    check_builtin({}, TASKS, "x", "k")
    check_builtin({"retrieval@8": {"task": "retrieval", "n": 100, "n_pairs": 8}, "arithmetic": {"n": 200}}, TASKS,
                  "sft.yaml", "eval.sets", named_sets=True)
    check_builtin({"math": {"n": 10, "max_operand": 9}, "general": {"n": 4, "n_pairs": [2, 3]}},
                  PREFERENCE_BUILDERS, "rm.yaml", "data.builtin")


def test_check_builtin_preference_categories():
    with pytest.raises(ConfigError, match=r"rm\.yaml: 'eval\.builtin\.saftey' is not a built-in preference category "
                                          r"\(did you mean 'safety'\?\); valid preference categories: math, safety, "
                                          r"over_refusal, general"):
        check_builtin({"saftey": {"n": 4}}, PREFERENCE_BUILDERS, "rm.yaml", "eval.builtin", noun=CATEGORY)
    with pytest.raises(ConfigError, match=r"rm\.yaml: 'data\.builtin\.math\.n' = 1\.5 must be int, got float"):
        check_builtin({"math": {"n": 1.5}}, PREFERENCE_BUILDERS, "rm.yaml", "data.builtin", noun=CATEGORY)


def test_builders_check_their_spec_before_building():
    with pytest.raises(ConfigError, match=r"'builtin\.arithmetic\.n' = 'ten' must be int"):
        build_sft_mix({"safety": {"n": 5}, "arithmetic": {"n": "ten"}}, [], seed=0)
    with pytest.raises(ConfigError, match=r"'spec\.r@8\.task' = 'retrival'"):
        heldout_sets({"r@8": {"task": "retrival", "n": 5}}, seed=0)
    with pytest.raises(ConfigError, match=r"'spec\.poetry' is not a built-in preference category"):
        build_preferences({"poetry": {"n": 5}}, seed=0)


def _builtin_specs(node, key=""):
    """(dotted key, spec, named_sets) of every built-in data spec in a parsed stage or pipeline YAML."""
    if not isinstance(node, dict):
        return []
    found = []
    for name, value in node.items():
        dotted = f"{key}.{name}" if key else str(name)
        if dotted.split(".")[-1] in ("builtin", "exclude_builtin") or dotted.endswith("eval.sets"):
            found.append((dotted, value, dotted.endswith("eval.sets")))
        else:
            found += _builtin_specs(value, dotted)
    return found


def test_shipped_configs_pass_check_builtin():
    import pathlib

    import yaml

    checked = 0
    for path in sorted(pathlib.Path(__file__).parents[1].glob("configs/**/*.yaml")):
        preferences = path.stem in ("rm", "eval_rm")
        for key, spec, named in _builtin_specs(yaml.safe_load(path.read_text())):
            registry = PREFERENCE_BUILDERS if preferences and not named else TASKS
            check_builtin(spec, registry, str(path), key, named_sets=named)
            checked += 1
    assert checked >= 12


# --- shared row helpers -----------------------------------------------------------------------------------------

def test_prompt_of():
    user, reply = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    system = {"role": "system", "content": "s"}
    assert prompt_of({"messages": [system, user, reply]}) == [system, user]
    assert prompt_of({"messages": [user]}) == [user]  # nothing to strip
    assert prompt_of({"prompt": [user], "messages": [user, reply]}) == [user]  # a pool / preference row
    assert prompt_of({"prompt": None, "messages": [user, reply]}) == [user]  # a Dataset row without a prompt
    row = {"messages": [user, reply]}
    prompt_of(row).append(reply)
    assert row["messages"] == [user, reply]  # a new list: the row is not changed through it


def test_drop_too_long_on_lists_and_datasets():
    rows = [{"text": "a" * k} for k in (3, 9, 5, 12)]
    kept, dropped = drop_too_long(rows, lambda r: len(r["text"]), 5)
    assert kept == [rows[0], rows[2]] and dropped == 2
    ds, dropped = drop_too_long(datasets.Dataset.from_list(rows), lambda r: len(r["text"]), 9)
    assert isinstance(ds, datasets.Dataset) and ds["text"] == ["aaa", "a" * 9, "aaaaa"] and dropped == 1
    assert drop_too_long([], len, 1) == ([], 0)


def test_chat_length_counts_chat_template_tokens():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("configs/tiny/base")
    row = arithmetic_examples(1, seed=0)[0]
    ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert chat_length(tokenizer, row["messages"]) == len(ids) > chat_length(tokenizer, prompt_of(row))
    rows = [row, retrieval_examples(1, seed=0, n_pairs=64)[0]]
    kept, dropped = drop_too_long(rows, lambda r: chat_length(tokenizer, r["messages"]), len(ids))
    assert kept == [row] and dropped == 1
