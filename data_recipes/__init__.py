"""Builders that turn sources (built-in verifiable tasks, user chat files) into training and evaluation data."""

from data_recipes.dpo_pairs import PairOptions, build_dpo_pairs, load_pairs
from data_recipes.io import DataError, chat_length, drop_too_long, load_messages_file, prompt_of
from data_recipes.prompt_pool import PoolOptions, build_prompt_pool, load_pool
from data_recipes.preferences import PREFERENCE_BUILDERS, build_preferences, load_preference_file
from data_recipes.sft_mix import build_sft_mix, heldout_sets
from data_recipes.specs import check_builtin
from data_recipes.tasks import TASKS, tokenizer_corpus

__all__ = ["DataError", "TASKS", "build_preferences", "build_sft_mix", "heldout_sets", "load_messages_file",
           "load_preference_file", "tokenizer_corpus"]
__all__ += ["PairOptions", "build_dpo_pairs", "load_pairs"]
__all__ += ["PoolOptions", "build_prompt_pool", "load_pool"]
__all__ += ["PREFERENCE_BUILDERS", "chat_length", "check_builtin", "drop_too_long", "prompt_of"]
