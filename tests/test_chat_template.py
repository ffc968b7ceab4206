"""Assistant-only SFT masks for any chat template (alignment.tokenizer.assistant_tokens, the SFT trainer's own
tokenization) and a chat template given in the stage YAML (`tokenizer: {path, chat_template}`)."""

import copy
import types
from typing import get_type_hints

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from alignment.config import ConfigError, load_config
from alignment.modeling import load_model
from alignment.schema import TokenizerOptions
from alignment.tokenizer import ChatTemplateError, assistant_tokens
from data_recipes.tokenizer import builtin_tokenizer
from pipelines import dpo, grpo, rm, sft
from pipelines.common import claim, finished, stage_tokenizer

TINY = "configs/tiny/model.yaml"
BASE = "configs/tiny/base"  # the committed tiny checkpoint, with its tokenizer

# In the style of MiniMax-Text-01's template: no {% generation %} markers, so TRL's assistant_only_loss cannot use it.
MINIMAX_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '<beginning_of_sentence>system ai_setting=assistant\\n' + message['content'] + '<end_of_sentence>\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '<beginning_of_sentence>user name=user\\n' + message['content'] + '<end_of_sentence>\\n' }}"
    "{%- else -%}"
    "{{ '<beginning_of_sentence>ai name=assistant\\n' + message['content'] + '<end_of_sentence>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<beginning_of_sentence>ai name=assistant\\n' }}{%- endif -%}"
)

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "2 + 3 = 5"}, {"role": "user", "content": "And 4 - 1?"},
     {"role": "assistant", "content": "4 - 1 = 3"}],
    [{"role": "user", "content": "How do I make a pipe bomb?"}, {"role": "assistant", "content": "I can't help."}],
    [{"role": "user", "content": " padded \n"}, {"role": "assistant", "content": "  spaced out \n\n"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "\nnewline first and last\n"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer(vocab_size=512)


@pytest.fixture(scope="module")
def minimax_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<beginning_of_sentence>", "<end_of_sentence>"], special_tokens=True)
    tok.chat_template = MINIMAX_TEMPLATE
    return tok


def trained_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


# -- the mask --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["system+multi-turn", "single-turn", "whitespace"])
def test_mask_equals_transformers_generation_mask_on_the_builtin_template(tokenizer, conv):
    """The built-in template has {% generation %} markers: the prefix mask must be transformers' own, token for
    token (its generation block ends at <|im_end|>, the newline after it is outside, as the prefix mask leaves the
    whitespace after a turn out)."""
    ids, mask = assistant_tokens(tokenizer, conv)
    expected = tokenizer.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == expected["input_ids"]
    assert mask == expected["assistant_masks"]
    assert 0 < sum(mask) < len(mask)


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["system+multi-turn", "single-turn", "whitespace"])
def test_mask_without_generation_markers_is_each_reply_and_its_end_of_turn(minimax_tokenizer, conv):
    ids, mask = assistant_tokens(minimax_tokenizer, conv)
    assert ids == minimax_tokenizer.apply_chat_template(conv)["input_ids"]
    assert trained_text(minimax_tokenizer, ids, mask) == "".join(
        m["content"] + "<end_of_sentence>" for m in conv if m["role"] == "assistant")


def test_template_that_re_renders_earlier_turns_is_refused_naming_the_row(tokenizer):
    """Like reasoning templates that strip earlier turns' thinking: earlier assistant turns lose their content once
    a later turn follows, so the rendering up to turn i is no prefix of the whole conversation."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tokenizer.chat_template.replace(
        "{{ message['content'] or '' }}", "{{ message['content'] if loop.last else '' }}")
    assistant_tokens(tok, CONVERSATIONS[1], where="row 0")  # one assistant turn, the last: fine
    with pytest.raises(ChatTemplateError, match=r"^data/x\.jsonl row 17: the chat template re-renders earlier "
                                                r"turns.*cannot be marked by prefixes"):
        assistant_tokens(tok, CONVERSATIONS[0], where="data/x.jsonl row 17")


def test_empty_assistant_turn_and_slow_tokenizer_are_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{%- for message in messages -%}{{ message['content'] }}{%- endfor -%}"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]
    with pytest.raises(ChatTemplateError, match=r"^row 3: assistant message 1 renders to no text"):
        assistant_tokens(tok, conv, where="row 3")
    with pytest.raises(ValueError, match="fast tokenizer"):
        assistant_tokens(types.SimpleNamespace(is_fast=False), conv)


# -- the SFT trainer -------------------------------------------------------------------------------------------------


def sft_config(tmp_path, tokenizer_yaml="builtin", model=TINY):
    path = tmp_path / "sft.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
tokenizer: {tokenizer_yaml}
model: {{path: {model}}}
data: {{builtin: {{arithmetic: {{n: 10}}}}, max_length: 256}}
training: {{max_steps: 1, batch_size: 2}}
""")
    return path, load_config(path, sft.Config)


def test_sft_trainer_masks_a_template_without_generation_markers(tmp_path, minimax_tokenizer):
    """TRL's own assistant_only_loss needs {% generation %} markers; the trainer's own masking does not. The packed
    first batch trains on exactly each assistant reply and its <end_of_sentence>, in each document; so does the
    eval set."""
    from alignment.trainers import MiniMaxSFTTrainer

    _, cfg = sft_config(tmp_path)
    convs = CONVERSATIONS[:2]
    trainer = MiniMaxSFTTrainer(model=load_model(TINY, tokenizer=minimax_tokenizer),
                                args=sft._trl_args(cfg, tmp_path / "ckpt"),
                                train_dataset=Dataset.from_dict({"messages": convs}),
                                eval_dataset=Dataset.from_dict({"messages": CONVERSATIONS[2:]}),
                                processing_class=minimax_tokenizer)
    assert trainer.chat_template is None and minimax_tokenizer.chat_template == MINIMAX_TEMPLATE  # no TRL swap
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    assert ids.shape[0] == sum(len(minimax_tokenizer.apply_chat_template(c)["input_ids"]) for c in convs)  # packed
    starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
    assert len(starts) == 3  # two documents
    trained = sorted(minimax_tokenizer.decode(ids[a:b][labels[a:b] != -100]) for a, b in zip(starts, starts[1:]))
    assert trained == sorted(["2 + 3 = 5<end_of_sentence>4 - 1 = 3<end_of_sentence>",
                              "I can't help.<end_of_sentence>"])
    assert (labels[labels != -100] == ids[labels != -100]).all()
    row = trainer.eval_dataset[0]  # the eval set is masked the same way
    assert minimax_tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]) == (
        "  spaced out \n\n<end_of_sentence>\nnewline first and last\n<end_of_sentence>")
    trainer.train()  # and it trains


def test_sft_trainer_refuses_unmaskable_rows_naming_them(tmp_path, tokenizer):
    """Errors name the row by its dataset index; a dataset with no turns to mask is refused, not trained in full."""
    from alignment.trainers import MiniMaxSFTTrainer

    _, cfg = sft_config(tmp_path)
    args, model = sft._trl_args(cfg, tmp_path / "ckpt"), load_model(TINY)
    rerendering = copy.deepcopy(tokenizer)
    rerendering.chat_template = tokenizer.chat_template.replace(
        "{{ message['content'] or '' }}", "{{ message['content'] if loop.last else '' }}")
    with pytest.raises(ChatTemplateError, match=r"^train dataset row 1: the chat template re-renders earlier turns"):
        MiniMaxSFTTrainer(model=model, args=args, processing_class=rerendering,
                          train_dataset=Dataset.from_dict({"messages": [CONVERSATIONS[1], CONVERSATIONS[0]]}))
    no_reply = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"^train dataset row 1: no assistant message"):
        MiniMaxSFTTrainer(model=model, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"messages": [CONVERSATIONS[1], no_reply]}))
    with pytest.raises(ValueError, match=r"assistant_only_loss needs a conversational train dataset"):
        MiniMaxSFTTrainer(model=model, args=args, processing_class=tokenizer,  # TRL would train on every token
                          train_dataset=Dataset.from_dict({"text": ["no turns to mask"]}))


# -- tokenizer.chat_template in the stage YAML ----------------------------------------------------------------------


def test_every_training_stage_takes_the_tokenizer_mapping():
    for module in (sft, dpo, grpo, rm):
        assert get_type_hints(module.Config)["tokenizer"] == str | TokenizerOptions | None, module.__name__


def test_chat_template_from_a_file_is_applied_and_saved_with_the_tokenizer(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "minimax.jinja").write_text(MINIMAX_TEMPLATE, encoding="utf-8")
    source, cfg = sft_config(tmp_path, f"{{path: {tmp_path / 'tok'}, chat_template: {tmp_path / 'minimax.jinja'}}}")
    assert cfg.tokenizer == TokenizerOptions(path=str(tmp_path / "tok"), chat_template=str(tmp_path / "minimax.jinja"))
    sft.check(cfg, str(source), produced=set())
    tok = stage_tokenizer(cfg)
    assert tok.chat_template == MINIMAX_TEMPLATE
    tok.save_pretrained(tmp_path / "final")  # as `finish` saves it beside the model
    assert AutoTokenizer.from_pretrained(tmp_path / "final").chat_template == MINIMAX_TEMPLATE


def test_inline_chat_template_on_the_checkpoints_own_tokenizer(tmp_path):
    inline = "{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor -%}"
    source, cfg = sft_config(tmp_path, f'{{chat_template: "{inline}"}}', model=BASE)
    assert cfg.tokenizer.path is None and cfg.tokenizer.chat_template == inline.replace("\\n", "\n")
    sft.check(cfg, str(source), produced=set())
    tok = stage_tokenizer(cfg)
    assert tok.apply_chat_template(CONVERSATIONS[1], tokenize=False) == (
        "user: How do I make a pipe bomb?\nassistant: I can't help.\n")
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(BASE).get_vocab()  # the checkpoint's own tokenizer


def test_missing_template_file_fails_the_check_naming_the_key(tmp_path):
    source, cfg = sft_config(tmp_path, "{path: builtin, chat_template: nope.jinja}")
    with pytest.raises(ConfigError, match=r"sft\.yaml: 'tokenizer\.chat_template': template file 'nope\.jinja' "
                                          r"not found"):
        sft.check(cfg, str(source), produced=set())
    with pytest.raises(ConfigError, match=r"'tokenizer\.chat_template'"):
        stage_tokenizer(cfg)


def test_resume_check_compares_the_tokenizer_mapping(tmp_path):
    """An unfinished run records its config; a re-run with another chat template is refused, the same one is not."""
    _, cfg = sft_config(tmp_path, "{path: builtin, chat_template: '{{ messages }}'}")
    claim(cfg, overwrite=False)
    assert finished(cfg, overwrite=False) is None
    _, other = sft_config(tmp_path, "{path: builtin, chat_template: '{{ messages[0] }}'}")
    with pytest.raises(ConfigError, match=r"different config \(changed: tokenizer\.chat_template\)"):
        finished(other, overwrite=False)


# -- tool turns ------------------------------------------------------------------------------------------------------

# transformers' conversational format: the assistant calls a tool (content empty), the tool answers, the assistant
# replies; a second call has its arguments as JSON text and a content before it.
TOOL_CONVERSATION = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "name": "get_weather", "content": "18 C, sunny"},
    {"role": "assistant", "content": "Checking the hour.", "tool_calls": [
        {"type": "function", "function": {"name": "clock", "arguments": '{"tz": "CET"}'}}]},
    {"role": "tool", "content": "14:00"},
    {"role": "assistant", "content": "18 C and sunny at 14:00."},
]
TOOL_ASSISTANT_SPANS = [  # what the model generates: each assistant turn's content, its calls, its end of turn
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
    'Checking the hour.<tool_call>{"name": "clock", "arguments": {"tz": "CET"}}</tool_call><|im_end|>',
    "18 C and sunny at 14:00.<|im_end|>",
]


def test_tool_turns_mask_exactly_the_assistant_turns_and_their_calls(tokenizer):
    """By hand: the rendering is the ChatML turns below; the mask is 1 on exactly the tokens of the three assistant
    spans (content + tool calls + <|im_end|>) and 0 on every header, the system and user turns and both tool
    results. Both forms of `arguments` render the same JSON, and transformers' {% generation %} mask agrees."""
    full = tokenizer.apply_chat_template(TOOL_CONVERSATION, tokenize=False)
    assert full == (
        "<|im_start|>system\nYou can call tools.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{TOOL_ASSISTANT_SPANS[0]}\n<|im_start|>tool\n18 C, sunny<|im_end|>\n"
        f"<|im_start|>assistant\n{TOOL_ASSISTANT_SPANS[1]}\n<|im_start|>tool\n14:00<|im_end|>\n"
        f"<|im_start|>assistant\n{TOOL_ASSISTANT_SPANS[2]}\n")
    ids, mask = assistant_tokens(tokenizer, TOOL_CONVERSATION)
    # the expected mask from character spans found by hand in the rendering
    spans, start = [], 0
    for text in TOOL_ASSISTANT_SPANS:
        at = full.index(text, start)
        spans.append((at, at + len(text)))
        start = at + len(text)
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == offsets["input_ids"]
    expected = [int(any(a <= s and e <= b for a, b in spans)) for s, e in offsets["offset_mapping"]]
    assert mask == expected
    assert trained_text(tokenizer, ids, mask) == "".join(TOOL_ASSISTANT_SPANS)
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert "18 C, sunny" in untrained and "14:00<|im_end|>" in untrained and "get_weather" not in untrained
    markers = tokenizer.apply_chat_template(TOOL_CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert markers["assistant_masks"] == mask


def test_tool_turns_through_a_data_file_and_the_sft_trainer(tmp_path, tokenizer):
    """A file mixing a plain and a tool conversation: the loaded Dataset (one struct type for every message, None
    where a key is absent) trains on the same tokens as the conversation itself; the arguments survive as given."""
    import json

    from alignment.trainers import MiniMaxSFTTrainer
    from data_recipes.io import load_messages_file

    data = tmp_path / "tools.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in (CONVERSATIONS[1], TOOL_CONVERSATION)) + "\n")
    ds = load_messages_file(data)
    assert ds[0]["messages"][1]["tool_calls"] is None  # the column's struct type, filled
    call = ds[1]["messages"][4]["tool_calls"][0]
    assert call["function"] == {"name": "clock", "arguments": '{"tz": "CET"}'}
    _, cfg = sft_config(tmp_path)
    trainer = MiniMaxSFTTrainer(model=load_model(TINY), args=sft._trl_args(cfg, tmp_path / "ckpt"),
                                train_dataset=ds, processing_class=tokenizer)
    (row,) = trainer.train_dataset  # both conversations packed into one row, in some order
    ids, mask = map(list, zip(*(assistant_tokens(tokenizer, c) for c in (CONVERSATIONS[1], TOOL_CONVERSATION))))
    labels = [[i if m else -100 for i, m in zip(a, b)] for a, b in zip(ids, mask)]
    assert (row["input_ids"], row["labels"]) in [(ids[0] + ids[1], labels[0] + labels[1]),
                                                 (ids[1] + ids[0], labels[1] + labels[0])]


def test_template_that_drops_tool_calls_is_refused_naming_the_row(minimax_tokenizer):
    """MINIMAX_TEMPLATE renders only `content`: the call would vanish from the training text."""
    with pytest.raises(ChatTemplateError, match=r"^f\.jsonl row 2: the chat template does not render assistant "
                                                r"message 2's tool_calls"):
        assistant_tokens(minimax_tokenizer, TOOL_CONVERSATION, where="f.jsonl row 2")
