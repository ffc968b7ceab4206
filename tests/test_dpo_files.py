"""DPO from your own preference files (TRL's prompt/chosen/rejected rows: plain, conversational, implicit prompt),
tool turns inside a response scored on assistant tokens only, and the reference switch (`dpo.reference: live` vs
`precomputed`, one process and 2 ranks): same losses and weights."""

import json
import math
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from alignment.config import load_config
from alignment.modeling import load_model
from data_recipes import DataError
from data_recipes.preferences import check_dpo_row, load_dpo_preferences
from data_recipes.tokenizer import builtin_tokenizer
from pipelines.dpo import Config as DPOStageConfig, dpo_args, run

TINY = "configs/tiny/model.yaml"
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny architecture from random weights + the built-in tokenizer, as a checkpoint directory."""
    path = tmp_path_factory.mktemp("ckpt")
    tokenizer = builtin_tokenizer(vocab_size=512)
    tokenizer.save_pretrained(path)
    model = load_model(TINY, seed=0)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.save_pretrained(path)
    return path


def arithmetic_pairs(n=16):
    """(question, right reply, wrong reply) triples: what a preference file of maths answers holds."""
    out = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        out.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}", f"{a} + {b} = {a + b + 3}"))
    return out


def rows_in(fmt: str) -> list[dict]:
    if fmt == "plain":
        return [{"prompt": f"Q: {q}\nA: ", "chosen": c, "rejected": r} for q, c, r in arithmetic_pairs()]
    if fmt == "conversational":
        return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}], "source": "handmade"} for q, c, r in arithmetic_pairs()]
    assert fmt == "implicit"  # whole conversations sharing their first turns, no prompt column
    return [{"chosen": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": q},
                        {"role": "assistant", "content": c}],
             "rejected": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": q},
                          {"role": "assistant", "content": r}]} for q, c, r in arithmetic_pairs()]


def write_rows(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def stage_yaml(tmp_path, checkpoint, files, reference="live", steps=12, lr=1.0e-3, extra=""):
    path = tmp_path / "dpo.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
model: {{path: {checkpoint}, router_aux_loss_coef: 0.0}}
pairs: {{sample: false, files: [{", ".join(map(str, files))}]}}
dpo: {{beta: 0.5, max_length: 128, reference: {reference}}}
training: {{max_steps: {steps}, learning_rate: {lr}, batch_size: 4, logging_steps: 1, save_steps: 100{extra}}}
eval: {{sets: {{arithmetic: {{n: 4, max_operand: 9}}}}, max_new_tokens: 4}}
""")
    return path


# -- the files -------------------------------------------------------------------------------------------------------


def test_the_three_formats_load_to_trl_rows(tmp_path):
    rows, kind = load_dpo_preferences(write_rows(tmp_path / "p.jsonl", rows_in("plain")))
    assert kind == "plain" and rows[0] == {"prompt": "Q: What is 1 + 2?\nA: ", "chosen": "1 + 2 = 3",
                                           "rejected": "1 + 2 = 6"}
    rows, kind = load_dpo_preferences(write_rows(tmp_path / "c.parquet", rows_in("conversational")))
    assert kind == "conversational" and rows[0]["chosen"] == [{"role": "assistant", "content": "1 + 2 = 3"}]
    assert "source" not in rows[0]  # TRL reads the three columns only
    rows, kind = load_dpo_preferences(write_rows(tmp_path / "i.jsonl", rows_in("implicit")))
    assert kind == "conversational" and rows[0] == {  # the shared first turns are the prompt, as trl.extract_prompt
        "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 1 + 2?"}],
        "chosen": [{"role": "assistant", "content": "1 + 2 = 3"}],
        "rejected": [{"role": "assistant", "content": "1 + 2 = 6"}]}


USER, ANSWER = [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}]
BAD_ROWS = {
    "missing key": ({"prompt": "q", "chosen": "a"}, "rejected is missing"),
    "wrong type": ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen is int; expected a string"),
    "empty": ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen is empty"),
    "empty list": ({"prompt": USER, "chosen": [], "rejected": ANSWER}, "chosen is empty"),
    "chosen == rejected": ({"prompt": USER, "chosen": ANSWER, "rejected": ANSWER}, "chosen == rejected"),
    "formats mixed": ({"prompt": "q", "chosen": ANSWER, "rejected": ANSWER + ANSWER}, "prompt is text but chosen"),
    "bad message": ({"prompt": USER, "chosen": [{"role": "bot", "content": "a"}], "rejected": ANSWER},
                    "chosen[0].role is 'bot'"),
    "response starts with user": ({"prompt": USER, "chosen": USER + ANSWER, "rejected": ANSWER},
                                  "chosen[0].role is 'user'"),
    "plain implicit prompt": ({"chosen": "q a", "rejected": "q b"}, "prompt is missing"),
    "nothing shared": ({"chosen": ANSWER, "rejected": USER + ANSWER}, "share no leading message"),
    "tool schemas": ({"prompt": USER, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": "b"}],
                      "tools": [{"type": "function"}]}, "tools: tool schemas are not rendered"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_name_file_row_and_key(tmp_path, case):
    bad, expected = BAD_ROWS[case]
    good = rows_in("plain" if isinstance(bad.get("prompt", bad.get("chosen")), str) else "conversational")[:2]
    path = write_rows(tmp_path / "prefs.jsonl", good + [bad])
    with pytest.raises(DataError) as err:
        load_dpo_preferences(path)
    assert str(err.value).startswith(f"{path} row 3: ") and expected in str(err.value), str(err.value)


def test_a_file_in_two_formats_is_refused_at_the_first_odd_row(tmp_path):
    path = write_rows(tmp_path / "mixed.jsonl", rows_in("conversational")[:2] + rows_in("plain")[:1])
    with pytest.raises(DataError, match=r"mixed\.jsonl row 3: a plain row in a conversational file \(row 1"):
        load_dpo_preferences(path)


def test_bad_file_is_refused_by_the_command_before_any_work(tmp_path, checkpoint):
    """One `error:` line naming file, row and key, exit code 2, no output directory: the row check runs in the
    stage's `check`, so `pipeline --check` finds it too, before the first stage trains."""
    data = write_rows(tmp_path / "prefs.jsonl", rows_in("conversational")[:4] + [
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant"}], "rejected": ANSWER}])
    result = subprocess.run([sys.executable, "-m", "pipelines", "dpo", "--config",
                             str(stage_yaml(tmp_path, checkpoint, [data]))], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1",
                                              "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert f"{data} row 5: chosen[0].content is missing" in errors[0]
    assert not (tmp_path / "run").exists()


def test_plain_files_do_not_mix_with_sampled_pairs(tmp_path, checkpoint):
    from pipelines.dpo import check

    path = stage_yaml(tmp_path, checkpoint, [write_rows(tmp_path / "p.jsonl", rows_in("plain"))])
    cfg = load_config(path, DPOStageConfig, {"pairs.sample": True, "prompts.builtin": {"arithmetic": {"n": 4}}})
    with pytest.raises(DataError, match=r"p\.jsonl: plain-text pairs \(strings\) cannot be trained together with "
                                        r"the sampled pairs"):
        check(cfg, str(path), produced=set())


# -- training from a file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,suffix", [("plain", ".jsonl"), ("conversational", ".parquet"), ("implicit", ".jsonl")])
def test_dpo_trains_from_a_preference_file(tmp_path, checkpoint, fmt, suffix):
    """16 pairs, 3 epochs of 4 steps of 4 pairs from random weights: the loss starts at log 2 (policy = reference)
    and falls, the implicit reward margin rises, every pair of the last batch is ranked right, the weights move."""
    data = write_rows(tmp_path / f"prefs{suffix}", rows_in(fmt))
    metrics = run(load_config(stage_yaml(tmp_path, checkpoint, [data]), DPOStageConfig))
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    margins = [e["rewards/margins"] for e in history if "rewards/margins" in e]
    assert metrics["train"]["pairs"] == metrics["train"]["file_pairs"] == 16
    # single steps are noisy (4 pairs a batch): compare epochs (4 steps each); measured on this machine, all three
    # formats: loss 0.75 -> 0.44 (epoch 1 -> 3 means), margin -0.08 -> 0.74
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and margins[0] == pytest.approx(0.0, abs=1e-4)
    first, last = slice(0, 4), slice(-4, None)
    assert sum(losses[last]) / 4 < 0.8 * sum(losses[first]) / 4, losses
    assert sum(margins[last]) / 4 > 0.5 > sum(margins[first]) / 4, margins
    assert metrics["train"]["rewards/accuracies/last"] == 1.0
    start, trained = load_model(str(checkpoint)).state_dict(), load_model(str(tmp_path / "run" / "final")).state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)


# -- tool turns inside a response ------------------------------------------------------------------------------------

TOOL_PAIR = {
    "prompt": [{"role": "user", "content": "Weather in Paris?"}],
    "chosen": [{"role": "assistant", "content": "", "tool_calls": [
                   {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "18 C, sunny"},
               {"role": "assistant", "content": "18 C and sunny."}],
    "rejected": [{"role": "assistant", "content": "I cannot know that."}],
}


def _trainer(tmp_path, checkpoint, rows, reference="live", dtype="float32", lora=False):
    from alignment.trainers import MiniMaxDPOTrainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "t.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
model: {{path: {checkpoint}, router_aux_loss_coef: 0.0, dtype: {dtype}{", lora: {r: 4, alpha: 8}" if lora else ""}}}
prompts: {{builtin: {{arithmetic: {{n: 4}}}}}}
dpo: {{beta: 0.5, max_length: 128, reference: {reference}}}
training: {{max_steps: 4, learning_rate: 3.0e-3, batch_size: 4, logging_steps: 1, save_steps: 100}}
""")
    cfg = load_config(path, DPOStageConfig)
    torch.manual_seed(0)  # the LoRA init draws from the global RNG (a stage seeds it first: set_seed)
    policy = load_model(cfg.model)
    ref = load_model(cfg.model) if reference == "live" and not lora else None  # LoRA: the model, adapter off
    return MiniMaxDPOTrainer(model=policy, ref_model=ref, args=dpo_args(cfg, tmp_path / "ckpt"),
                             train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(
                                 checkpoint))


def test_single_turn_pairs_tokenize_as_trl_does(tmp_path, checkpoint):
    """For responses of one assistant turn the trainer's own tokenization is TRL's: the same ids, and every
    completion token scored (mask all ones, as TRL's collator does)."""
    from trl import DPOTrainer

    rows = [check_dpo_row(r, "row") for r in rows_in("conversational")[:4] + rows_in("implicit")[:2]]
    trainer = _trainer(tmp_path, checkpoint, rows)
    theirs = DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), trainer.processing_class, trainer.args,
                                         "train")
    ours = trainer.train_dataset
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[key] == theirs[key]
    assert all(set(m) == {1} and len(m) == len(ids) for m, ids in zip(ours["chosen_mask"], ours["chosen_ids"]))


def test_tool_output_inside_a_response_is_not_scored(tmp_path, checkpoint):
    """By hand: the chosen response is a tool call, the tool's result, the answer. Its scored tokens are exactly
    the call and the answer with their end-of-turn tokens (and the newline TRL scores after the last one); the tool
    turn and the assistant header after it are not; the rejected one-turn response is scored whole, as TRL does."""
    trainer = _trainer(tmp_path, checkpoint, [check_dpo_row(TOOL_PAIR, "row 1")])
    tok = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    ids, mask = batch["input_ids"], batch["completion_mask"]

    def scored(i):
        return tok.decode(ids[i][mask[i] == 1])

    assert scored(0) == ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
                         "18 C and sunny.<|im_end|>\n")
    assert scored(1) == "I cannot know that.<|im_end|>\n"
    row = trainer.train_dataset[0]
    unscored = tok.decode([t for t, m in zip(row["chosen_ids"], row["chosen_mask"]) if not m])
    assert unscored == "\n<|im_start|>tool\n18 C, sunny<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)  # policy = reference: log 2 whatever the mask
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)


# -- the reference: live copy or precomputed log-probs ---------------------------------------------------------------


@pytest.mark.parametrize("dtype,lora", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_precomputed_reference_gives_the_live_losses_and_weights(tmp_path, checkpoint, dtype, lora):
    """4 steps each way on the same pairs (FP32 head, a tool-turn pair included): the precomputed run holds no
    reference model, its dataset carries the reference log-probs, equal to the live reference's; in float32 its
    losses, margins and weights are the live run's. bf16: TRL would precompute inside its __init__, before the FP32 head is installed, so
    the reference log-probs would carry the bf16 head's rounding, which the live reference does not have (measured:
    up to 1.9e-3 nats, 3e-5 relative, on these pairs; the check below allows 1e-6). LoRA: both references are the
    model with its new adapter off."""
    rows = [check_dpo_row(r, "row") for r in rows_in("conversational")[:7]] + [check_dpo_row(TOOL_PAIR, "row")]
    results = {}
    for reference in ("live", "precomputed"):
        trainer = _trainer(tmp_path / reference, checkpoint, rows, reference=reference, dtype=dtype, lora=lora)
        if reference == "precomputed":
            assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
            live_ref = results["live"][2]
            assert trainer.train_dataset["ref_chosen_logps"] == pytest.approx(live_ref, abs=1e-6, rel=1e-6)
        else:
            assert (trainer.ref_model is None) == lora
        ref_logps = None
        if reference == "live":  # the live reference's own numbers for every row, in order, for the check above
            # in the precompute's batches (4 rows in order, so the same padded shapes: bf16 sums depend on them)
            ref_logps = []
            for start in range(0, len(rows), 4):
                batch = trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + 4)])
                with torch.no_grad():
                    ref_logps += trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, batch)[0].tolist()
        trainer.train()
        history = [e for e in trainer.state.log_history if "loss" in e]
        results[reference] = (history, {k: v.clone() for k, v in trainer.model.state_dict().items()}, ref_logps)
    live, pre = results["live"][0], results["precomputed"][0]
    w_live, w_pre = results["live"][1], results["precomputed"][1]
    gap = max(float((w_live[k].float() - w_pre[k].float()).abs().max()) for k in w_live)
    assert len(live) == len(pre) == 4
    if dtype == "bfloat16":
        # a bf16 forward's sums depend on the batch's padded shape, and the live reference scores each training
        # batch while the precompute scored other batches: ~2e-5 on the first loss, one bf16 ulp on some weights
        # after 4 steps (measured). The reference numbers themselves are equal (above); that is what is checked.
        assert pre[0]["loss"] == pytest.approx(live[0]["loss"], abs=1e-4)
        return
    # float32 (measured: identical to the last bit on this machine)
    for a, b in zip(live, pre):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], abs=1e-6, rel=1e-6), key
    assert gap < 1e-6


def _deepspeed_runs_here() -> bool:
    from test_multiprocess import _deepspeed_runs_here as runs

    return runs()


@pytest.mark.parametrize("zero3", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _deepspeed_runs_here(), reason="DeepSpeed not installed (pip install -e '.[deepspeed]')"))],
    ids=["ddp", "zero3"])
def test_precomputed_reference_on_two_ranks_ends_where_one_process_with_a_live_reference_ends(tmp_path,
                                                                                             checkpoint, zero3):
    """torchrun, 2 ranks (gloo, CPU), per-rank batch 2, `reference: precomputed` (the numbers computed on both
    ranks' shards of the pairs and gathered) against one process, batch 4, a live reference: the same final metrics
    and weights within tests/test_multiprocess.py's tolerances (all-reduce order), the same `final/` files. zero3:
    the 2 ranks under DeepSpeed ZeRO-3 (its CPU accelerator), where the precompute runs the sharded policy through
    one inference engine and no reference model exists at all. Measured (this machine, DeepSpeed 0.19.8): weights
    max |gap| 9.5e-6 and 8.4e-6 of the update's norm for both, last loss equal to 1e-6; ~25 s each."""
    from test_multiprocess import ROOT as REPO, assert_same_metrics, assert_same_weights, launch

    data = write_rows(tmp_path / "prefs.jsonl", rows_in("conversational"))
    runs = {}
    for nproc, reference in ((1, "live"), (2, "precomputed")):
        tmp = tmp_path / f"nproc{nproc}"
        tmp.mkdir()
        extra = ", adam_epsilon: 1.0e-8" + (f", deepspeed: {REPO / 'configs/deepspeed/zero3.json'}"
                                             if zero3 and nproc == 2 else "")
        stage = stage_yaml(tmp, checkpoint, [data], reference=reference, steps=4, extra=extra).read_text()
        stage = stage.replace("batch_size: 4", f"batch_size: {4 // nproc}")
        (tmp / "dpo.yaml").write_text(stage.replace("dpo: {beta: 0.5,", "dpo: {sft_weight: 0.0, beta: 0.5,"))
        (tmp / "pipeline.yaml").write_text(f"output_root: {tmp / 'run'}\nseed: 0\nstages:\n"
                                           f"  - {{name: dpo, kind: dpo, config: {tmp / 'dpo.yaml'}}}\n")
        result = launch(tmp / "pipeline.yaml", nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = tmp / "run" / "dpo"
    m1, m2 = (json.loads((runs[n] / "metrics.json").read_text()) for n in (1, 2))
    assert m2["config"]["dpo"]["reference"] == "precomputed" and m2["train"]["global_step"] == 4
    assert_same_metrics(m1, m2, "dpo")
    assert sorted(p.name for p in (runs[1] / "final").iterdir()) == sorted(p.name for p in (runs[2] / "final").iterdir())
    assert_same_weights(runs[2] / "final", runs[1] / "final", checkpoint, "dpo")


# -- pairs scored by a trained reward model beside the verifiers -----------------------------------------------------


def test_sampled_pairs_are_scored_by_the_verifier_plus_the_reward_model(tmp_path, checkpoint):
    """pairs.reward = correctness + 0.1 x a reward model (a score head on the checkpoint, as the rm stage builds
    it): every sample's recorded score is the verifier's plus 0.1 x the RM's own score of it, and chosen/rejected
    are the best/worst of those [01 §5.4.1: scored by the reward models, chosen = best, rejected = worst]."""
    from alignment.rollout import build_rollout
    from data_recipes.dpo_pairs import PairOptions, build_dpo_pairs
    from rewards import build_reward
    from rewards.reward_model import RewardModel

    rm_dir = tmp_path / "rm"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    load_model(str(checkpoint), head="score", seed=1, tokenizer=tokenizer).save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    model = load_model(str(checkpoint))
    worker = build_rollout("transformers", model, tokenizer, batch_size=8)
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}"}], "task": "arithmetic",
             "answer": str(a + b), "harmful": False, "n_pairs": 0} for a, b in [(1, 2), (3, 4), (5, 6)]]
    spec = {"correctness": {"weight": 1.0}, "reward_model": {"path": str(rm_dir), "weight": 0.1}}
    opts = PairOptions(temperatures=[0.8, 1.5], samples_per_temperature=2, max_new_tokens=6, min_margin=0.0,
                       reward=spec)
    pairs, _ = build_dpo_pairs(worker, rows, opts, seed=0, policy=str(checkpoint), reward=build_reward(spec))
    rm, correctness = RewardModel(rm_dir), build_reward({"correctness": {}})
    assert len(pairs) == 3  # an untrained RM never ties: every group makes a pair at min_margin 0
    for rec in pairs:
        n = len(rec["samples"])
        right = correctness([rec["prompt"]] * n, rec["samples"], task=["arithmetic"] * n,
                            answer=[rec["answer"]] * n).scores
        expected = [c + 0.1 * s for c, s in zip(right, rm.score([rec["prompt"]] * n, rec["samples"]))]
        assert rec["scores"] == pytest.approx(expected, abs=1e-5)
        assert rec["score_chosen"] == max(expected) and rec["score_rejected"] == min(expected)


def test_shipped_pipelines_score_dpo_pairs_with_their_rm_stage(tmp_path):
    """configs/548m and configs/minimax_text_01: an rm stage before DPO (from stage I, not a policy stage, so long
    SFT still starts from SFT), and both DPO stages' reward_model reads that stage's final/ (the 548M ones beside
    the verifier). The 548M GRPO stage and pair sampling need vLLM, so the plan is taken without the one and with the
    transformers backend for the other; the released pipeline's full --check is tests/test_released.py's."""
    from alignment.config import read_yaml
    from pipelines.run import plan

    spec = read_yaml("configs/548m/pipeline.yaml")
    spec["stages"] = [s for s in spec["stages"] if s["kind"] != "grpo"]
    for s in spec["stages"]:
        if s["kind"] == "dpo":
            s["set"]["pairs.rollout.backend"] = "transformers"
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    stages = {s.spec.name: s for s in plan(path)}
    assert list(stages) == ["sft", "rm", "long_sft", "dpo", "long_dpo"]
    assert stages["long_sft"].cfg.model.path == str(stages["sft"].final)
    assert stages["rm"].cfg.model.path == str(stages["sft"].final)
    for name in ("dpo", "long_dpo"):
        reward = stages[name].cfg.pairs.reward
        assert reward["reward_model"]["path"] == str(stages["rm"].final) and "correctness" in reward
    released = read_yaml("configs/minimax_text_01/pipeline.yaml")["stages"]
    assert [s["name"] for s in released][:2] == ["sft", "rm"]
    assert all(s["set"]["pairs.reward.reward_model.path"] == "{rm}" for s in released if s["kind"] == "dpo")
