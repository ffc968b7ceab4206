"""A small byte-level BPE tokenizer with a ChatML template, trained locally so tiny runs need no hub access; and
`assistant_tokens`, the assistant-only SFT loss mask for any chat template (generation markers or not).

MiniMax-Text-01 has a 200,064-token vocabulary; the tiny model gets a few hundred tokens trained on the built-in
tasks' text (`data_recipes.tokenizer.builtin_tokenizer` passes that corpus in). Digits are split one per token before BPE, so "85" is always "8" "5": numbers then share their digit
embeddings and the tiny model can learn column-wise arithmetic instead of memorising merged multi-digit tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML. The assistant's content and its closing <|im_end|> sit inside {% generation %} so that transformers'
# return_assistant_tokens_mask marks what the model must generate, to answer and to stop; the newline after
# <|im_end|> is outside, as is every header. (The SFT trainer's mask, `assistant_tokens`, needs no markers and
# marks the same tokens.) Tool use, in transformers' conversational format: an assistant turn's `tool_calls` are
# rendered inside that turn, after its content, one `<tool_call>{"name": ..., "arguments": ...}</tool_call>` each
# (the model generates them, so they are assistant tokens); a `tool` message (a tool's result) is its own
# `<|im_start|>tool` turn, which the model reads and never generates. `arguments` may be a mapping (rendered as
# JSON) or a JSON string (as is). Turns without tool calls render exactly as before tools existed.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] or '' }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{{ '<tool_call>{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' }}"
    "{{- fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) }}"
    "{{- '}</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def train_tokenizer(texts, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`; eos is <|im_end|> so generation stops at the end of the assistant turn."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # No offset-trimming post-processor: the assistant mask maps characters to tokens, and every character
    # (a leading space included) must belong to a token.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes, none is unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


class ChatTemplateError(ValueError):
    """A conversation whose assistant turns the chat template cannot mark; the message names the row."""


def template_messages(messages: list[dict]) -> list[dict]:
    """`messages` as a chat template expects them (transformers' conversational format): keys whose value is None
    dropped (a `datasets` column gives every message every key any message has, None where absent, so a plain turn
    would carry `tool_calls: None`), and a tool call's `arguments` given as a JSON string parsed into the mapping
    templates render (data files keep them as strings: a column of mappings with different keys would be merged
    into one struct type, filling absent arguments with None).

    >>> template_messages([{"role": "assistant", "content": "", "tool_calls": [
    ...     {"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}, {"role": "user",
    ...     "content": "hi", "tool_calls": None}])
    [{'role': 'assistant', 'content': '', 'tool_calls': [{'type': 'function', 'function': {'name': 'f', 'arguments': {'x': 1}}}]}, {'role': 'user', 'content': 'hi'}]
    """
    import json

    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                call = {k: v for k, v in call.items() if v is not None}
                fn = {k: v for k, v in call.get("function", {}).items() if v is not None}
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass  # a template may take any string; data files are checked where they are read
                calls.append({**call, "function": fn} if "function" in call else call)
            message["tool_calls"] = calls
        out.append(message)
    return out


def assistant_tokens(tokenizer, messages: list[dict], where: str = "") -> tuple[list[int], list[int]]:
    """(input_ids, mask) of `messages` rendered by `tokenizer`'s chat template, mask 1 on the tokens the model must
    generate: each assistant turn's content and end-of-turn token, not headers, other roles or trailing whitespace.

    Works for any template, `{% generation %}` markers or not, by rendering prefixes of the conversation: for the
    assistant message i, P = render(messages[:i], add_generation_prompt=True) and Q = render(messages[:i + 1]); its
    span is the characters [len(P), len(Q)) of the full rendering, less the whitespace after the turn's last
    non-space character (the model stops at its end-of-turn token and never generates what follows). On the
    built-in template this is exactly transformers' `return_assistant_tokens_mask`. A token straddling a span
    boundary is marked when any of its characters is in the span (as `return_assistant_tokens_mask` does).

    Tool use (transformers' format): an assistant turn's `tool_calls` are part of that turn, so the tokens the
    template renders for them are marked; a `tool` message (a tool's result) is another role's turn, never marked.
    `messages` go through `template_messages` first (None-valued keys dropped, JSON-string arguments parsed).

    The full rendering is tokenized once (`add_special_tokens=False`, as `apply_chat_template` does), so the ids
    are the template's own. Errors (`ChatTemplateError`, naming `where`, e.g. "data/x.jsonl row 17"): a template
    that re-renders earlier turns (P, Q and the full rendering are not successive prefixes, e.g. one that strips
    earlier turns' reasoning), an assistant turn that renders to nothing, or one whose `tool_calls` the template does not
    render (it renders the same without them: the call would silently vanish from training). A slow tokenizer, which has no character offsets, is a
    ValueError.

    >>> tok = train_tokenizer(["2 + 3 = 5"], vocab_size=300)
    >>> ids, mask = assistant_tokens(tok, [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}])
    >>> tok.decode([i for i, m in zip(ids, mask) if m])
    '5<|im_end|>'
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"assistant_tokens needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}")
    at = f"{where}: " if where else ""
    messages = template_messages(messages)

    def render(msgs, prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"{at}the chat template re-renders earlier turns: messages[:{i}] with the generation prompt, "
                f"messages[:{i + 1}] and the whole conversation do not render to successive prefixes (e.g. it drops "
                "earlier assistant turns' reasoning), so assistant turns cannot be marked by prefixes; use a "
                "template that renders each turn the same whatever follows it"
            )
        end = len(through.rstrip())
        if end <= len(before):
            raise ChatTemplateError(f"{at}assistant message {i} renders to no text: nothing to train on")
        if message.get("tool_calls"):
            without = {k: v for k, v in message.items() if k != "tool_calls"}
            if render(messages[:i] + [without]) == through:
                raise ChatTemplateError(
                    f"{at}the chat template does not render assistant message {i}'s tool_calls (the turn renders "
                    "the same without them), so the model would be trained as if it never called the tool; use a "
                    "template that renders tool calls (the built-in one does)")
        spans.append((len(before), end))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    # a token is in a span when any of its characters are (zero-width tokens never are)
    mask = [int(any(s < span_end and e > span_start for span_start, span_end in spans))
            for s, e in encoding["offset_mapping"]]
    return encoding["input_ids"], mask
