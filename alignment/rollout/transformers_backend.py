"""Rollout backend 1: `model.generate` from transformers (CPU or GPU), sampling from the training model itself.

Per-token log-probs and the repetition early stop ride on generate's own hooks rather than a custom decode loop:
`_StepRecorder`, a logits processor placed before transformers' temperature / top-k / top-p warpers, sees the raw
logits of each step and keeps log softmax(logits / T); a stopping criterion, called right after the step's token is
appended, reads that token's log-prob, tracks the run of confident tokens and each row's length.
Only one step of (B, V) log-probs is held at a time, never the whole (B, T, V).

`record_routes=True` (router replay, `alignment.routing`): every router call of the generate (the prefill over the
left-padded prompts, then one call per decode step) is recorded, and each completion gets the experts of every
position the engine computed, prompt and completion ([prompt + completion tokens, L, K] int16): what the trainer's
forward over prompt + completion recomputes. The last completion token is never fed back when generation stops
right after sampling it; its row is -1 (the trainer routes it by itself: its routes change only the logits after
the completion, which no loss reads).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from alignment import routing
from alignment.modeling import warn_if_off_device
from alignment.rollout.base import RolloutBatch, SamplingOptions, encode_prompts, eos_ids, stop_metrics


class _StepRecorder(LogitsProcessor):
    """Logits processor (placed before the warpers): keeps log softmax(raw logits / T) of the current step."""

    def __init__(self, batch_size: int, temperature: float, eos_ids: list[int], stop_k: int | None, stop_p: float,
                 device):
        self.temperature = temperature
        self.eos = torch.tensor(eos_ids, device=device)
        self.stop_k, self.log_stop_p = stop_k, math.log(stop_p)
        self.step_logp = None
        self.logprobs: list[torch.Tensor] = []  # per step, (B,)
        self.run = torch.zeros(batch_size, dtype=torch.long, device=device)  # consecutive confident tokens
        self.length = torch.full((batch_size,), -1, dtype=torch.long, device=device)  # -1: still running
        self.reason = ["length"] * batch_size

    def __call__(self, input_ids, scores):
        self.step_logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def after_step(self, input_ids) -> torch.Tensor:
        """The step's token is input_ids[:, -1]: record its log-prob, update runs and lengths; (B,) bool done."""
        token = input_ids[:, -1]
        logp = self.step_logp.gather(1, token[:, None]).squeeze(1)
        step = len(self.logprobs)
        self.logprobs.append(logp)
        running = self.length < 0
        self.run = torch.where(logp > self.log_stop_p, self.run + 1, torch.zeros_like(self.run))
        is_eos = torch.isin(token, self.eos) & running
        repeat = (self.run >= self.stop_k) & running & ~is_eos if self.stop_k else torch.zeros_like(is_eos)
        for b in torch.nonzero(is_eos | repeat).flatten().tolist():
            self.reason[b] = "eos" if is_eos[b] else "repetition"
        self.length = torch.where(is_eos | repeat, torch.full_like(self.length, step + 1), self.length)
        return self.length >= 0


class _AfterStep(StoppingCriteria):
    """Stopping criterion (called right after each step's token is appended) that defers to the recorder."""

    def __init__(self, recorder: _StepRecorder):
        self.recorder = recorder

    def __call__(self, input_ids, scores, **kwargs):
        return self.recorder.after_step(input_ids)


class TransformersRollout:
    """`RolloutWorker` on `model.generate`. `sync_weights(model)` points it at the trainer's (updated) model: the
    weights are shared, so there is nothing to copy (a separate-engine backend copies them there).
    `record_routes`: batches carry `routes` (see the module docstring), else `routes=None`."""

    def __init__(self, model, tokenizer, batch_size: int = 64, record_routes: bool = False):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.record_routes = record_routes

    def sync_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list, n: int, sampling: SamplingOptions) -> RolloutBatch:
        warn_if_off_device(self.model, "rollout")
        prompt_ids = [ids for ids in encode_prompts(self.tokenizer, prompts) for _ in range(n)]
        completions, logprobs, reasons, routes = [], [], [], []
        starts = range(0, len(prompt_ids), self.batch_size)
        # a bar when the call takes several batches (pair sampling, the success-rate pass), so a slow one shows
        for start in tqdm(starts, desc=f"sampling {len(prompt_ids)} completions", leave=False, mininterval=10,
                          disable=len(starts) <= 1):
            c, lp, r, rt = self._generate_batch(prompt_ids[start : start + self.batch_size], sampling)
            completions += c
            logprobs += lp
            reasons += r
            routes += rt or []
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return RolloutBatch(prompt_ids, completions, logprobs, texts, reasons, n=n, metrics=stop_metrics(reasons),
                            routes=routes if self.record_routes else None)

    def _generate_batch(self, prompt_ids: list[list[int]], sampling: SamplingOptions):
        model, tok = self.model, self.tokenizer
        device = next(model.parameters()).device
        width = max(len(p) for p in prompt_ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        eos = eos_ids(tok)
        recorder = _StepRecorder(len(prompt_ids), sampling.temperature, eos, sampling.repetition_stop_k,
                                 sampling.repetition_stop_p, device)
        was_training = model.training
        model.eval()
        recording = routing.record_routes(model) if self.record_routes else nullcontext()
        try:
            # no router logits while decoding: transformers' aux loss breaks on cached steps, and it is unused here
            with recording as log:
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=sampling.temperature,
                    top_k=sampling.top_k, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                    logits_processor=LogitsProcessorList([recorder]),
                    stopping_criteria=StoppingCriteriaList([_AfterStep(recorder)]),
                    eos_token_id=eos, pad_token_id=pad, output_router_logits=False)
        finally:
            model.train(was_training)
        new = out[:, width:].tolist()
        steps = torch.stack(recorder.logprobs, dim=1).tolist() if recorder.logprobs else [[] for _ in new]
        lengths = [n if n >= 0 else len(row) for n, row in zip(recorder.length.tolist(), new)]
        completions = [row[:n] for row, n in zip(new, lengths)]
        logprobs = [row[:n] for row, n in zip(steps, lengths)]
        routes = None
        if log is not None:
            # (B, width + decode steps, L, K): the prefill's positions, then one per token fed back
            full = log.routes(len(prompt_ids)).to("cpu", torch.int16)
            routes = []
            for b, (p, n) in enumerate(zip(prompt_ids, lengths)):
                r = full.new_full((len(p) + n, *full.shape[2:]), -1)
                ran = full[b, width - len(p):width + n]  # short of the last token when it was never fed back
                r[:len(ran)] = ran
                routes.append(r)
        return completions, logprobs, list(recorder.reason), routes
