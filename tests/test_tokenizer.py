"""The locally trained tokenizer (alignment/tokenizer.py): round trip, digits, assistant mask, reload."""


import pytest
from transformers import AutoTokenizer
from trl.chat_template_utils import is_chat_template_stop_token_trained

from alignment.tokenizer import IM_END, IM_START, PAD
from data_recipes.tokenizer import builtin_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 37 + 48?"},
    {"role": "assistant", "content": "37 + 48 = 85"},
    {"role": "user", "content": "Data: tiger=039; apple=482.\nWhat is the value of tiger?"},
    {"role": "assistant", "content": "039"},
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tokenizer = builtin_tokenizer(vocab_size=512)
    tokenizer.save_pretrained(out)
    return tokenizer, out


def test_vocab_and_special_tokens(saved):
    tok, _ = saved
    assert len(tok) == 512
    assert (tok.pad_token, tok.eos_token) == (PAD, IM_END)
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in (PAD, IM_START, IM_END))


def test_round_trip(saved):
    tok, _ = saved
    for text in ["What is 37 + 48?", "Data: tiger=039; apple=482.", "How do I kill a Python process?",
                 "unicode: café ☕ 東京", "  leading spaces\n\ttabs"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_digits_are_single_tokens(saved):
    tok, _ = saved
    ids = tok.encode("1234567890", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == list("1234567890")
    assert tok.decode(tok.encode(" 039", add_special_tokens=False)[-3:]) == "039"


def test_assistant_mask_covers_exactly_assistant_tokens(saved):
    tok, _ = saved
    out = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    spans, current = [], []  # contiguous mask==1 runs
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    spans += [current] if current else []
    assert [tok.decode(s) for s in spans] == ["37 + 48 = 85" + IM_END, "039" + IM_END]
    # Everything else (system/user turns, headers, newlines) is unmasked: removing the assistant spans from the
    # rendered text leaves exactly the unmasked tokens.
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    for reply in ("37 + 48 = 85", "039"):
        rendered = rendered.replace(f"assistant\n{reply}{IM_END}", "assistant\n")
    assert tok.decode([t for t, m in zip(ids, mask) if not m]) == rendered
    assert is_chat_template_stop_token_trained(tok)


def test_generation_prompt(saved):
    tok, _ = saved
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("What is 37 + 48?<|im_end|>\n<|im_start|>assistant\n")
    full = tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert full.startswith(prompt)  # the prompt is a prefix of the trained sequence


def test_autotokenizer_reload(saved):
    tok, out = saved
    again = AutoTokenizer.from_pretrained(out)
    assert again.chat_template == tok.chat_template and again.eos_token == IM_END and again.pad_token == PAD
    for text in ["What is 12 - 7?", "I can't help with that."]:
        assert again.encode(text) == tok.encode(text)
    assert (again.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
            == tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True))
