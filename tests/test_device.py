"""Device placement: the one loader puts every model on `model.device` (the process's GPU by default), evaluation and
sampling run where the model is, and generating on the CPU beside a GPU is reported.

CPU machines check the placement on the `meta` device and with CUDA's presence faked; the CUDA test runs on a GPU
machine (`python -m pytest -q tests/test_device.py`)."""

import warnings

import pytest
import torch

from alignment import modeling
from alignment.config import ConfigError
from alignment.evaluation import generate_greedy
from alignment.modeling import ModelOptions, load_model, resolve_device, warn_if_off_device
from alignment.rollout import build_rollout
from alignment.rollout.base import SamplingOptions
from data_recipes.tokenizer import builtin_tokenizer

TINY = "configs/tiny/model.yaml"
CONVERSATIONS = [[{"role": "user", "content": "2 + 3 ="}], [{"role": "user", "content": "7 - 1 ="}]]


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA reported present (nothing is placed on it: the tests below move models to meta or keep them on CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(modeling, "_warned", set())


def test_auto_is_this_process_gpu_when_there_is_one(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused_by_name():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="model.device: cuda but this torch sees no CUDA device"):
        resolve_device("cuda")


def test_a_bad_device_name_fails_at_config():
    with pytest.raises(ConfigError, match="model.device: 'gpu0' is not a device"):
        ModelOptions(path=TINY, device="gpu0")


def test_the_loader_places_policy_and_reward_models():
    """Every parameter and buffer on the configured device, the FP32 head included, for both heads."""
    for head in ("lm", "score"):
        model = load_model(ModelOptions(path=TINY, device="meta"), head=head)
        assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}, head
    cpu = load_model(ModelOptions(path=TINY, device="cpu"))
    assert {p.device.type for p in cpu.parameters()} == {"cpu"}


def test_evaluation_feeds_the_model_on_its_device(fake_cuda):
    """generate_greedy sends its batches to the model's device (here meta: a GPU stand-in) and does not warn; the
    same call with the model on the CPU beside a (faked) GPU warns, naming what was generating."""
    tokenizer = builtin_tokenizer(vocab_size=1024)
    model = load_model(ModelOptions(path=TINY, device="meta"), tokenizer=tokenizer)
    seen = []

    def generate(input_ids, **kwargs):
        seen.append(input_ids.device.type)
        return torch.full((input_ids.shape[0], input_ids.shape[1] + 1), tokenizer.eos_token_id)

    model.generate = generate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_greedy(model, tokenizer, CONVERSATIONS, max_new_tokens=1, batch_size=1, desc="eval sums")
    assert seen == ["meta", "meta"]

    on_cpu = load_model(ModelOptions(path=TINY, device="cpu"), tokenizer=tokenizer)
    with pytest.warns(UserWarning, match="eval sums: the model is on the CPU while CUDA is available"):
        generate_greedy(on_cpu, tokenizer, CONVERSATIONS[:1], max_new_tokens=1, batch_size=1, desc="eval sums")
    with pytest.warns(UserWarning, match="rollout: the model is on the CPU"):
        build_rollout("transformers", on_cpu, tokenizer).generate(CONVERSATIONS[:1], n=2,
                                                                 sampling=SamplingOptions(max_new_tokens=2))
    with warnings.catch_warnings():  # once per phase, not per call
        warnings.simplefilter("error")
        warn_if_off_device(on_cpu, "rollout")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_models_evaluation_and_sampling_run_on_the_gpu():
    """On a GPU machine, the default `auto` puts the committed tiny base on cuda:0; greedy evaluation and sampled
    rollouts run there with no off-device warning, and give the CPU's greedy answers."""
    from alignment.modeling import load_tokenizer

    tokenizer = load_tokenizer("configs/tiny/base")
    model = load_model(ModelOptions(path="configs/tiny/base"), tokenizer=tokenizer)
    assert {p.device for p in model.parameters()} == {torch.device("cuda", 0)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpu = generate_greedy(model, tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=2)
        batch = build_rollout("transformers", model, tokenizer).generate(CONVERSATIONS, n=2,
                                                                      sampling=SamplingOptions(max_new_tokens=4))
    assert not [w for w in caught if "on the CPU" in str(w.message)]
    assert len(batch) == 4 and all(batch.completion_ids)
    cpu = generate_greedy(model.to("cpu"), tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=2)
    assert gpu == cpu
