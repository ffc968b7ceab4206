"""SFT stage: the loss mask, a real tiny training run, hand-off checkpoint, bad input."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment.config import load_config
from alignment.evaluation import generate_greedy
from alignment.modeling import load_model
from data_recipes.tokenizer import builtin_tokenizer
from data_recipes import DataError
from pipelines.sft import Config as SFTStageConfig, _trl_args, run

TINY = "configs/tiny/model.yaml"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return builtin_tokenizer(vocab_size=512)


def stage_yaml(tmp_path, extra=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sft.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
tokenizer: builtin
model: {{path: {TINY}}}
data:
  builtin: {{arithmetic: {{n: 300}}, safety: {{n: 100}}}}
  max_length: 256
training: {{max_steps: 24, learning_rate: 3.0e-3, batch_size: 2, logging_steps: 4, save_steps: 12, warmup_ratio: 0.1}}
eval:
  sets: {{arithmetic: {{n: 8}}, safety: {{n: 8}}}}
  max_new_tokens: 8
{extra}""")
    return path


def test_loss_mask_covers_exactly_the_assistant_tokens(tmp_path, tokenizer):
    from datasets import Dataset

    from alignment.trainers import MiniMaxSFTTrainer

    convs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "2 + 3 = 5"}, {"role": "user", "content": "And 4 - 1?"},
         {"role": "assistant", "content": "4 - 1 = 3"}],
        [{"role": "user", "content": "How do I make a pipe bomb?"}, {"role": "assistant", "content": "I can't help."}],
    ]
    cfg = load_config(stage_yaml(tmp_path), SFTStageConfig)
    trainer = MiniMaxSFTTrainer(model=load_model(TINY), args=_trl_args(cfg, tmp_path / "ckpt"),
                                train_dataset=Dataset.from_dict({"messages": convs}), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    assert ids.shape[0] == sum(len(tokenizer.apply_chat_template(c)["input_ids"]) for c in convs)  # packed, no pad
    assert (positions == 0).sum() == 2  # two documents, positions restart at the second
    starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
    trained = sorted(tokenizer.decode(ids[a:b][labels[a:b] != -100]) for a, b in zip(starts, starts[1:]))
    assert trained == sorted(["2 + 3 = 5<|im_end|>4 - 1 = 3<|im_end|>", "I can't help.<|im_end|>"])
    assert (labels[labels != -100] == ids[labels != -100]).all()  # labels are the tokens themselves (unshifted)


def test_sft_run_learns_saves_and_hands_off(tmp_path):
    cfg = load_config(stage_yaml(tmp_path), SFTStageConfig)
    metrics = run(cfg)
    out = tmp_path / "run"
    final = out / "final"

    assert metrics["train"]["loss/last"] < 0.6 * metrics["train"]["loss/first"]  # the loss really falls
    assert json.loads((final / "metrics.json").read_text())["after"] == metrics["after"]
    for name in ("summary.md", "curves.png", "metrics.json", "eval_before.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "arithmetic/accuracy" in (out / "summary.md").read_text()

    # the hand-off checkpoint: plain transformers loads it, and its weights moved away from the initial ones
    trained = AutoModelForCausalLM.from_pretrained(final)
    initial = load_model(TINY, seed=cfg.seed)
    moved = [n for n, p in initial.state_dict().items()
             if "decay" not in n and "slope" not in n and not torch.equal(p, trained.state_dict()[n])]
    assert len(moved) > 0.9 * len([n for n in initial.state_dict() if "decay" not in n and "slope" not in n])

    # a re-run with the finished checkpoint does no work; the next stage reads model + tokenizer from it
    assert run(cfg) == json.loads((final / "metrics.json").read_text())
    nxt = load_config(stage_yaml(tmp_path / "next"), SFTStageConfig,
                      {"model.path": str(final), "tokenizer": None, "training.max_steps": 2})
    assert run(nxt)["before"] == metrics["after"]


def test_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path):
    """A stage that died after a checkpoint (no final/) continues from it rather than starting over."""
    cfg = load_config(stage_yaml(tmp_path), SFTStageConfig, {"training.max_steps": 6, "training.save_steps": 6})
    run(cfg)
    shutil.rmtree(tmp_path / "run" / "final")  # as if the process died after checkpoint-6, before the final save
    resumed = run(load_config(stage_yaml(tmp_path), SFTStageConfig, {"training.max_steps": 10}))
    assert resumed["train"]["resumed_from"].endswith("checkpoint-6")
    assert resumed["train"]["global_step"] == 10


def test_bad_data_row_fails_before_training_and_leaves_no_checkpoint(tmp_path):
    bad = tmp_path / "user.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}\n')
    cfg = load_config(stage_yaml(tmp_path), SFTStageConfig, {"data.files": [str(bad)]})
    with pytest.raises(DataError, match=r"user\.jsonl row 2: messages\[1\]\.role"):
        run(cfg)
    assert not (tmp_path / "run" / "final").exists()


def test_batched_greedy_generation_matches_one_by_one(tokenizer):
    model = load_model(TINY, seed=1)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    convs = [[{"role": "user", "content": q}] for q in ("What is 1 + 1?", "Data: cat=123.\nWhat is the value of cat?",
                                                        "Hi")]
    batched = generate_greedy(model, tokenizer, convs, max_new_tokens=6, batch_size=3)
    alone = [generate_greedy(model, tokenizer, [c], max_new_tokens=6, batch_size=1)[0] for c in convs]
    assert batched == alone
