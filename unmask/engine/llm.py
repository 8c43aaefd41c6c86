"""The offline API: `LLM(model_dir).generate(prompts, params)`."""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import fields, replace
from functools import partial

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.infill import Infill, InfillOutput, lay_out, span_texts
from unmask.engine.outputs import PromptScores, RequestOutput
from unmask.engine.params import ParamError, SamplingParams


class LLM:
    """Synchronous batch generation with the same engine the server uses.

    `LLM("models/unmask-tiny", max_num_seqs=8)` takes any `EngineConfig` field
    as a keyword.
    """

    def __init__(self, model_dir: str, **config):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(config) - known
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineConfig(model_dir=model_dir, **config))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Infill | list[str | list[int] | Infill],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        batch = _prompt_list(prompts)
        per_prompt = params if isinstance(params, list) else [params or SamplingParams()] * len(batch)
        if len(per_prompt) != len(batch):
            raise ValueError(f"{len(per_prompt)} params for {len(batch)} prompts")
        ids = [f"offline-{uuid.uuid4().hex}" for _ in batch]
        pending = deque(zip(ids, batch, per_prompt))
        final: dict[str, RequestOutput] = {}
        try:
            while pending or self.engine.has_unfinished:
                self._admit(pending)
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for request_id in ids:  # a bad prompt met late, or an interrupt: leave no request behind
                self.engine.abort(request_id)
            raise
        return [final[i] for i in ids]

    def infill(
        self, pieces: list[str | list[int]], span_lengths: list[int], params: SamplingParams | None = None
    ) -> InfillOutput:
        """Write `span_lengths[i]` tokens between `pieces[i]` and `pieces[i + 1]`, all gaps in one request.

        Every span is written in full (end-of-text does not end the request: a span's
        text ends at its first end-of-text); `params.max_tokens` is ignored, the canvas
        being the spans and the pieces between them.
        """
        params = params or SamplingParams()
        if params.stop:
            raise ParamError("stop", "stop strings are not supported by infill: every span is written in full")
        infill = Infill(tuple(pieces), tuple(span_lengths))
        out = self.generate(infill, replace(params, ignore_eos=True))[0]
        mask_id = self.engine.model_config.mask_token_id
        layout = lay_out(infill, self.engine.encode, mask_id)
        eos_id = self.engine.model_config.eos_token_id
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        return InfillOutput(span_texts(layout, out.token_ids, eos_id, decode), out)

    def _admit(self, pending: deque[tuple[str, str | list[int] | Infill, SamplingParams]]) -> None:
        """Hand prompts to the engine while its waiting queue has room (any number of prompts fits a call)."""
        while pending and len(self.engine.scheduler.waiting) < self.engine.config.max_waiting:
            self.engine.add_request(*pending.popleft())

    def score(self, prompts: str | list[int] | list[str] | list[list[int]], top_logprobs: int = 0) -> list[PromptScores]:
        """Each prompt token's log p(x_i | x_<i, later positions masked) (see `engine.scoring`); the first is None."""
        batch = _prompt_list(prompts)
        jobs = [self.engine.make_scoring_job(f"score-{uuid.uuid4().hex}", p, top_logprobs) for p in batch]
        for job in jobs:
            while not job.done:
                self.engine.run_scoring(job)
        return [job.result() for job in jobs]

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do on one device)."""
        self.engine.close()

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """One chat turn through the checkpoint's chat template."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self.generate(ids, params)[0]


def _prompt_list(prompts: str | list[int] | Infill | list[str | list[int] | Infill]) -> list[str | list[int] | Infill]:
    """One prompt (text, token ids or an infill) or a list of them, as a list."""
    single = isinstance(prompts, (str, Infill)) or (prompts and isinstance(prompts[0], int))
    return [prompts] if single else list(prompts)
