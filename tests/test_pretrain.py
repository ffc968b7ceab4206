"""The tiny base's pretraining script: answers are scored on the right tokens, and a short run learns."""
import json

import pytest
from transformers import AutoModelForCausalLM

from data_recipes.tokenizer import builtin_tokenizer
from data_recipes.tasks import _is_heldout, arithmetic_documents, lookup_documents
from pipelines.pretrain import encode, main


def test_answer_positions_are_the_value_tokens(tmp_path):
    tokenizer = builtin_tokenizer(vocab_size=1024)
    docs = lookup_documents(8, seed=3, n_pairs=(2, 8), questions=3)
    ids, mask, answers = encode(tokenizer, docs)
    assert len(answers) == 8 * 3
    for (row, pos, end), (text, spans) in zip(answers.tolist(), [(t, s) for t, ss in docs for s in ss]):
        value = text[spans[0]:spans[1]]
        assert end == pos + 1
        assert tokenizer.decode([ids[row, pos].item()]) == value  # one token, the value word with its space
        assert tokenizer.decode(ids[row, pos - 2:pos].tolist()).endswith(" =")  # right after "key ="
    assert mask.sum() == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t, _ in docs)


def test_arithmetic_answers_cover_the_result_tokens(tmp_path):
    tokenizer = builtin_tokenizer(vocab_size=1024)
    docs = arithmetic_documents(6, seed=1, lines=5, max_operand=30)
    ids, mask, answers = encode(tokenizer, docs)
    flat = [(text, span) for text, spans in docs for span in spans]
    assert len(answers) == len(flat) == 30
    for (row, first, end), (text, (a, b)) in zip(answers.tolist(), flat):
        line = text[:b].rsplit("\n", 1)[-1]  # "x op y = r"
        x, op, y, _, result = line.split()
        assert int(result) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
        assert not _is_heldout(int(x), op, int(y))  # pretraining sees the train split only
        assert tokenizer.decode(ids[row, first:end].tolist()) == f" {result}"


def test_short_pretraining_lowers_loss_and_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "base"
    metrics = main(["--out", str(out), "--steps", "60", "--batch", "8", "--lr", "2e-3", "--eval-pairs", "2",
                    "--eval-every", "1000", "--log-every", "5", "--device", "cpu"])
    log = json.loads((tmp_path / "base.log" / "log_history.json").read_text())
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0] - 0.2, losses
    assert json.loads((out / "pretrain_metrics.json").read_text())["after"] == metrics["after"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.pad_token_id is not None and (out / "tokenizer_config.json").is_file()

    # Phase 2 continues from that checkpoint (its weights and tokenizer) with arithmetic mixed in.
    more = main(["--model", str(out), "--out", str(tmp_path / "base2"), "--steps", "20", "--batch", "8",
                 "--arithmetic-share", "0.5", "--eval-pairs", "2", "--eval-every", "1000", "--device", "cpu"])
    assert more["before"]["lookup@2"] == metrics["after"]["lookup@2"]
    assert {"arithmetic@20", "arithmetic@30"} <= set(more["after"])


def test_missing_model_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "base"), "--steps", "1"])
    assert f"--model: {tmp_path / 'nope.yaml'}: config file not found" in capsys.readouterr().err
    assert not (tmp_path / "base").exists()
