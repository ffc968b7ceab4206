"""Config sections shared by the stages (model options live with the model, in `alignment.modeling`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.config import ConfigError


@dataclass
class TokenizerOptions:
    """A stage's `tokenizer:` as a mapping; the plain string form `tokenizer: X` is `{path: X}`."""

    # None: the tokenizer saved with the model checkpoint; "builtin": the built-in byte-level BPE trained on the task
    # suite's corpus (for a model YAML with fresh weights); otherwise a local tokenizer directory.
    path: str | None = None
    # Replaces the tokenizer's chat template (and is saved with the stage's final/ tokenizer): a template file (e.g.
    # .jinja, UTF-8), or the template text itself (it contains "{%" or "{{"). Needs no {% generation %} markers.
    chat_template: str | None = None

    @classmethod
    def of(cls, choice: str | TokenizerOptions | None) -> TokenizerOptions:
        """A stage's `tokenizer` field in the mapping form.

        >>> TokenizerOptions.of("builtin")
        TokenizerOptions(path='builtin', chat_template=None)
        """
        return choice if isinstance(choice, TokenizerOptions) else cls(path=choice)

    def template(self) -> str | None:
        """The chat template text to apply, None to keep the tokenizer's own; a `chat_template` that is neither
        template text nor a readable UTF-8 file is a `ConfigError` naming `tokenizer.chat_template`.

        >>> TokenizerOptions(chat_template="{{ messages[0]['content'] }}").template()
        "{{ messages[0]['content'] }}"
        >>> TokenizerOptions(chat_template="missing.jinja").template()
        Traceback (most recent call last):
        ...
        alignment.config.ConfigError: 'tokenizer.chat_template': template file 'missing.jinja' not found (template text itself contains '{%' or '{{')
        """
        text = self.chat_template
        if text is None or "{%" in text or "{{" in text:
            return text
        if not Path(text).is_file():
            raise ConfigError(f"'tokenizer.chat_template': template file '{text}' not found (template text itself "
                              "contains '{%' or '{{')")
        try:
            return Path(text).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"'tokenizer.chat_template': template file '{text}' is not UTF-8 text") from None


@dataclass
class DataSource:
    """Where a stage's rows come from: built-in builders and/or local files (the one data-spec schema; SFT data,
    DPO prompts and preference sets extend it)."""

    # Built-in builders: name -> kwargs (SFT/DPO: the task suite in data_recipes.tasks, e.g. {arithmetic: {n: 4000}};
    # reward models: the preference categories in data_recipes.preferences).
    builtin: dict[str, dict] = field(default_factory=dict)
    # Local .jsonl / .parquet files (chat `messages` rows; preference sets: prompt / chosen / rejected rows).
    files: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.required and not self.builtin and not self.files:
            raise ValueError("give at least one of 'builtin' or 'files'")

    required = True  # (a class attribute, not a YAML key) an optional source, e.g. held-out pairs, may be empty


@dataclass
class DataOptions(DataSource):
    # Packed row length (tokens). Samples longer than this are dropped, not truncated (MiniMax-01 Table 7).
    max_length: int = 512
    # Pack several documents per row; the model wrapper keeps them isolated (per-document state and mask).
    packing: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")


def _zero_stage(path: str | None) -> int | None:
    """The ZeRO stage of a DeepSpeed JSON (None without one, 0 when it names none)."""
    import json

    if path is None:
        return None
    try:
        return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))
    except (json.JSONDecodeError, ValueError, TypeError) as err:
        raise ValueError(f"training.deepspeed: {path}: not a DeepSpeed JSON with a numeric zero_optimization.stage "
                         f"({err})") from None


@dataclass
class TrainOptions:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 1e-5
    # MiniMax-01 Table 7: short stages decay cosine to 10% of the peak, long stages stay constant.
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.0  # share of the total steps
    batch_size: int = 8  # packed rows per device step
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # MiniMax-M1 §3: beta2 0.95 and eps 1e-15 (defaults failed to converge on gradients spanning 1e-18..1e-5).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-15
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    # GPU runs: bf16 mixed precision, and a DeepSpeed JSON (e.g. configs/deepspeed/zero3.json; launch the stage or the
    # pipeline with `accelerate launch`). CPU runs keep both off.
    bf16: bool = False
    deepspeed: str | None = None
    # Context parallelism (alignment.context_parallel): each packed row split over this many consecutive ranks of
    # the launch (the world size a multiple of it), for rows one GPU cannot hold (stage II: 1M tokens). 1 = off.
    # SFT and long SFT; the other stages refuse it.
    context_parallel: int = 1
    # Load the model partitioned (DeepSpeed zero.Init under the ZeRO-3 `deepspeed` file): each rank reads and keeps
    # only its 1/N slice of every weight from the start, so no host holds the whole model (a released 456B
    # checkpoint: ~0.9 TB in bf16). SFT, long SFT, DPO and GRPO (their reference models too), from a checkpoint
    # directory, without LoRA; the work before training runs on every rank (alignment.distributed.forward_ready).
    # Off: every rank loads the whole model and its trainer partitions it.
    zero_init: bool = False

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"training.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("batch_size", "grad_accum", "logging_steps", "save_steps", "context_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise ValueError(f"training.deepspeed: file '{self.deepspeed}' not found")
        if self.zero_init and (stage := _zero_stage(self.deepspeed)) != 3:
            raise ValueError("training.zero_init loads the model partitioned by DeepSpeed ZeRO-3: set "
                             "training.deepspeed to a stage-3 JSON (e.g. configs/deepspeed/zero3.json)"
                             + (f"; '{self.deepspeed}' is stage {stage}" if self.deepspeed else ""))
        if self.deepspeed is not None and self.context_parallel > 1:
            raise ValueError("training.context_parallel > 1 runs under DDP; with training.deepspeed it has not been "
                             "built or tested yet")

    def trainer_kwargs(self, output_dir: str | Path, seed: int) -> dict:
        """The `transformers.TrainingArguments` every stage shares (TRL's stage configs subclass it)."""
        import torch

        schedule = {"cosine": ("cosine_with_min_lr", {"min_lr_rate": self.min_lr_ratio}),
                    "constant": ("constant", {}), "linear": ("linear", {})}[self.lr_schedule]
        return dict(
            output_dir=str(output_dir),
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            learning_rate=self.learning_rate,
            lr_scheduler_type=schedule[0],
            lr_scheduler_kwargs=schedule[1],
            warmup_steps=self.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            adam_epsilon=self.adam_epsilon,
            logging_steps=self.logging_steps,
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            seed=seed,
            data_seed=seed,
            bf16=self.bf16,  # TRL defaults to True, i.e. bf16 autocast even on CPU: off unless asked for
            gradient_checkpointing=False,  # TRL defaults to True; load_model applies model.gradient_checkpointing
            deepspeed=self.deepspeed,
            report_to=["tensorboard"],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
        )


@dataclass
class EvalOptions:
    # Held-out sets: name -> {task, n, ...builder kwargs}, e.g. {"retrieval@32": {task: retrieval, n: 50, n_pairs: 32}}
    sets: dict[str, dict] = field(default_factory=dict)
    # Your own held-out sets: name -> {path: .jsonl/.parquet file, verifier: reward spec, n, max_new_tokens}; rows
    # hold a prompt and the verifier's fields (checked before training; data_recipes.evaluation.load_eval_files).
    files: dict[str, dict] = field(default_factory=dict)
    max_new_tokens: int = 16
    batch_size: int = 32
