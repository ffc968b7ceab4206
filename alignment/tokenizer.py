"""A small byte-level BPE tokenizer with a ChatML template, trained locally so tiny runs need no hub access.

MiniMax-Text-01 has a 200,064-token vocabulary; the tiny model gets a few hundred tokens trained on the built-in
tasks' text (`data_recipes.tokenizer.builtin_tokenizer` passes that corpus in). Digits are split one per token before BPE, so "85" is always "8" "5": numbers then share their digit
embeddings and the tiny model can learn column-wise arithmetic instead of memorising merged multi-digit tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML. The assistant's content and its closing <|im_end|> sit inside {% generation %} so that
# return_assistant_tokens_mask (TRL's assistant_only_loss) trains the model to answer and to stop; the newline
# after <|im_end|> is outside, as is every header, so the loss covers only what the model must generate.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
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
