"""The step loop: schedule, pick active positions, run the model, commit tokens, emit outputs.

`LLMEngine` is synchronous and single-threaded; `AsyncEngine` drives it from
its own thread for the server and `LLM` drives it for offline use.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from dataclasses import replace
from typing import Callable

import torch

from unmask.engine.checkpoint_defaults import checkpoint_defaults, read_generation_config, resolve_block_start
from unmask.engine.config import EngineConfig
from unmask.engine.cuda_graphs import build_graph_runner
from unmask.engine.detokenizer import TextStream
from unmask.engine.errors import EngineDeadError
from unmask.engine.infill import Infill, lay_out, refuse_unsupported
from unmask.engine.guide import GuideRunner, guide_state, load_guide
from unmask.engine.kv_pool import KVPool
from unmask.engine.models.loader import LoadedModel, load_model
from unmask.engine.outputs import BlockView, FinishReason, RequestOutput, StepStats
from unmask.engine.parallel import ShardLoader, TensorParallelGroup, TensorParallelRunner
from unmask.engine.params import ParamError, SamplingParams, check_text
from unmask.engine.policies import CACHE_POLICIES, UNMASK_POLICIES
from unmask.engine.policies.block_start import block_start_commit
from unmask.engine.runner import ModelRunner, SequenceWork
from unmask.engine.sampling import RowGroup
from unmask.engine.scheduler import Scheduler, SchedulerLimits
from unmask.engine.sequence import Sequence
from unmask.kernels.confidence import precompile_fused_confidence

log = logging.getLogger("unmask.engine")

StepListener = Callable[[StepStats], None]
Proposals = tuple[torch.Tensor, torch.Tensor]  # (token ids [N], confidence [N]) of a step's logit rows


def build_pool(loaded: LoadedModel, config: EngineConfig) -> KVPool:
    """Size the page pool from the explicit budget, or from free memory on the device."""
    budget = config.kv_cache_bytes(loaded.device)
    return KVPool.from_budget(loaded.config, budget, config.page_size, loaded.dtype, loaded.device, config.feature_cache)


class LLMEngine:
    """The engine; with `tensor_parallel_size` > 1 it is rank 0 of a tensor-parallel group.

    `loaded` is a model already in memory (one device only); `shards` gives each
    tensor-parallel rank its shard (default: slices of `config.model_dir`).
    Call `close()` when done with a tensor-parallel engine: it stops the workers.
    """

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, shards: ShardLoader | None = None):
        self.config = config
        self.parallel = TensorParallelGroup(config, shards) if config.tensor_parallel_size > 1 else None
        try:
            self._load(loaded)
        except BaseException:
            self.close()
            raise
        limits = SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting)
        self.scheduler = Scheduler(self.pool, limits)
        self.streams: dict[str, TextStream] = {}
        self.step_listeners: list[StepListener] = []

    def _load(self, loaded: LoadedModel | None) -> None:
        """The model, the guide, the KV pool and the runner (with tensor parallelism: rank 0's shares)."""
        config = self.config
        if self.parallel is not None:
            loaded = self.parallel.loaded
        self.loaded = loaded or load_model(config.model_dir, config.dtype, config.device, config.load_format)
        self.model_config = self.loaded.config
        self.defaults = checkpoint_defaults(
            config.defaults, self.model_config.arch, read_generation_config(config.model_dir)
        )
        self.tokenizer = self.loaded.tokenizer
        # Before the pool, which takes what memory is left.
        self.guide: GuideRunner | None = load_guide(config.guide_model, self.loaded)
        self.runner: ModelRunner | TensorParallelRunner
        if self.parallel is not None:
            self.runner = self.parallel.start()
            self.pool = self.runner.pool
        else:
            self.pool = build_pool(self.loaded, config)
            self.runner = ModelRunner(self.loaded, self.pool, build_graph_runner(self.loaded.model, self.pool, config))
            # Proposals are made here (tensor-parallel ranks reduce split logits instead).
            precompile_fused_confidence(self.model_config.vocab_size, self.loaded.dtype, self.loaded.device)

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one device); no step runs after it."""
        if self.parallel is not None:
            self.parallel.close()

    # --- requests -------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return min(self.model_config.max_position, self.pool.num_pages * self.pool.page_size)

    def make_sequence(self, request_id: str, prompt: str | list[int] | Infill, params: SamplingParams) -> Sequence:
        """Tokenize and validate a request without touching engine state (safe from any thread).

        An `Infill` prompt sets the canvas (its spans and the pieces between them) and
        the fixed suffix; its `max_tokens` is the canvas length.
        """
        layout = None
        if isinstance(prompt, Infill):
            layout = lay_out(prompt, self.encode, self.model_config.mask_token_id)
            params = replace(params, max_tokens=len(layout.canvas))
        resolved = resolve_block_start(params.resolve(self.defaults), self.model_config.arch)
        prompt_ids = self._prompt_ids(layout.prompt if layout else prompt)
        suffix = layout.suffix if layout else []
        total = len(prompt_ids) + resolved.max_tokens + len(suffix)
        if total > self.max_model_len:
            with_suffix = f" + suffix ({len(suffix)})" if suffix else ""
            raise ParamError(
                "max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({resolved.max_tokens}){with_suffix} = {total} "
                f"exceeds the model's context of {self.max_model_len} tokens",
            )
        if layout is not None and layout.has_fixed_text:
            refuse_unsupported(resolved.cache, resolved.unmask)
        self._check_support(resolved)
        seed = resolved.seed if resolved.seed is not None else secrets.randbits(63)
        return Sequence(
            request_id, prompt_ids, resolved, self.model_config.mask_token_id, self.model_config.eos_token_id, seed,
            canvas_ids=layout.canvas if layout else None, suffix_ids=suffix,
        )

    def encode(self, text: str) -> list[int]:
        """Text to token ids, as prompts are tokenized (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_support(self, params: SamplingParams) -> None:
        """Refuse the methods this engine was started without."""
        if CACHE_POLICIES[params.cache].needs_features and not self.pool.has_features:
            raise ParamError(
                "cache",
                f"cache={params.cache!r} needs the pool's feature pages: start the engine with feature_cache=True "
                "(`unmask serve --feature-cache`)",
            )
        if params.block_start == "first" and params.unmask == "guided":
            raise ParamError("block_start", "block_start='first' cannot be combined with unmask='guided'")
        if params.unmask == "guided" and self.guide is None:
            raise ParamError(
                "unmask", "unmask='guided' needs a guide model: start the engine with guide_model=DIR (`unmask serve --guide-model DIR`)"
            )

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            check_text("prompt", prompt)
            ids = self.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ParamError("prompt", f"token ids must be integers in [0, {vocab}); got {bad[:3]}")
        if not ids:
            raise ParamError("prompt", "the prompt is empty: a diffusion LM needs at least one prompt token")
        if self.model_config.mask_token_id in ids:
            raise ParamError("prompt", "the prompt contains the mask token")
        return ids

    def add_sequence(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self.streams[seq.request_id] = TextStream(self.tokenizer, list(seq.params.stop))

    def add_request(self, request_id: str, prompt: str | list[int] | Infill, params: SamplingParams) -> Sequence:
        seq = self.make_sequence(request_id, prompt, params)
        self.add_sequence(seq)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its pages; returns its final output, or None if unknown."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.ABORT)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # --- the step ---------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one denoising step for the scheduled sequences; return their outputs."""
        # Each candidate's work is planned once: its packed positions are the scheduler's cost.
        planned: dict[int, SequenceWork] = {}

        def cost(seq: Sequence) -> int:
            planned[id(seq)] = self._work_for(seq)
            return planned[id(seq)].positions.numel()

        batch = self.scheduler.schedule(cost)
        if not batch:
            return []
        start = time.perf_counter()
        scheduled = [planned[id(seq)] for seq in batch]
        for w in scheduled:
            w.seq.stats.active_positions += w.recomputed
        work, proposals, failures = self._forward(scheduled)
        outputs = [self._fail(seq, exc) for seq, exc in failures]
        committed, finished_blocks = 0, []
        if work:
            tokens, confidence = proposals
            offsets = [0, *itertools.accumulate(w.logit_positions.numel() for w in work)]
            self._consult_guide(work, tokens, offsets)
            for i, w in enumerate(work):
                rows = slice(offsets[i], offsets[i + 1])
                try:
                    n, block_steps = self._commit(w.seq, tokens[rows], confidence[rows])
                    committed += n
                    finished_blocks += block_steps
                    out = self._output(w.seq)
                except Exception as exc:  # one request's failure must not take the batch down
                    out = self._fail(w.seq, exc)
                if out is not None:
                    outputs.append(out)
        self._publish(StepStats(
            batch_size=len(batch),
            active_tokens=sum(w.recomputed for w in work),  # of the sequences that ran
            tokens_committed=committed,
            step_seconds=time.perf_counter() - start,
            pages_in_use=self.pool.num_used,
            pages_total=self.pool.num_pages,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            policies=[(s.params.cache, s.params.unmask) for s in batch],
            finished_blocks=finished_blocks,
        ))
        return outputs

    def _work_for(self, seq: Sequence) -> SequenceWork:
        targets = seq.masked_in_block()
        sources = targets - self.model_config.logits_shift  # Dream reads position i from output i - 1
        policy = CACHE_POLICIES[seq.params.cache]
        positions = policy.active_positions(seq)
        if self.model_config.logits_shift:
            positions = torch.unique(torch.cat([positions, sources]))
        return SequenceWork(seq, positions, sources, policy.key_length(seq), policy.features(seq))

    def _forward(
        self, work: list[SequenceWork]
    ) -> tuple[list[SequenceWork], Proposals | None, list[tuple[Sequence, Exception]]]:
        """Run the batch and propose tokens; if it fails, rerun each sequence alone so only the culprit fails.

        Returns the work that ran, its proposals (rows in work order) and the failures.
        An `EngineDeadError` (a tensor-parallel group failed) is no request's fault: it propagates.
        """
        try:
            return work, self._propose(work), []
        except EngineDeadError:
            raise
        except Exception as exc:
            if len(work) == 1:
                return [], None, [(work[0].seq, exc)]
            log.warning("batched step failed (%s); isolating the failing request", exc)
        ok, proposals, failures = [], [], []
        for w in work:
            try:
                proposals.append(self._propose([w]))
                ok.append(w)
            except EngineDeadError:
                raise
            except Exception as exc:
                failures.append((w.seq, exc))
        if not proposals:
            return ok, None, failures
        return ok, (torch.cat([p[0] for p in proposals]), torch.cat([p[1] for p in proposals])), failures

    def _propose(self, work: list[SequenceWork]) -> Proposals:
        return self.runner.propose(work, [self._row_group(w) for w in work])

    def _consult_guide(self, work: list[SequenceWork], tokens: torch.Tensor, offsets: list[int]) -> None:
        """One batched guide pass over the guided sequences' proposals (see `engine.guide`).

        Where the guide rejected a draft, its own token replaces that proposal in `tokens`.
        """
        guided = [i for i, w in enumerate(work) if w.seq.params.unmask == "guided"]
        if not guided:
            return
        assert self.guide is not None  # guided requests are refused without one
        try:
            self.guide.verify([(work[i].seq, tokens[offsets[i] : offsets[i + 1]]) for i in guided])
        except Exception:  # the guided requests then fail in their commit; the others go on
            log.exception("the guide model failed")
            return
        for i in guided:
            state = guide_state(work[i].seq)
            if state.correction is not None:
                tokens[offsets[i] + state.agreed] = state.correction

    @staticmethod
    def _row_group(w: SequenceWork) -> RowGroup:
        policy = UNMASK_POLICIES[w.seq.params.unmask]
        return RowGroup(w.seq.params, w.seq.generator, w.logit_positions.numel(), policy.random_confidence)

    def _commit(self, seq: Sequence, tokens: torch.Tensor, confidence: torch.Tensor) -> tuple[int, list[int]]:
        """Apply the unmask policy to one sequence's proposals; returns (tokens committed, steps of blocks finished)."""
        targets = seq.masked_in_block()
        chosen = block_start_commit(seq, targets)
        if chosen is None:
            chosen = UNMASK_POLICIES[seq.params.unmask].choose(seq, confidence)
        seq.tokens[targets[chosen]] = tokens[chosen]
        seq.last_committed = targets[chosen]
        seq.step += 1
        seq.last_block = seq.block
        seq.stats.forward_passes += 1
        seq.stats.tokens_committed += chosen.numel()
        finished_blocks = []
        if chosen.numel() == targets.numel():  # nothing left masked in the block
            seq.stats.steps_per_block.append(seq.step)
            finished_blocks.append(seq.step)
            seq.advance_block()
        return chosen.numel(), finished_blocks

    # --- outputs ----------------------------------------------------------------
    def _output(self, seq: Sequence) -> RequestOutput | None:
        stream = self.streams[seq.request_id]
        delta = stream.update(seq.committed_prefix(), final=False)
        reason = None
        if stream.stopped or seq.hit_eos():
            reason = FinishReason.STOP
        elif seq.canvas_done:
            reason = FinishReason.LENGTH
        if reason is not None:
            return self._finish(seq, reason, delta)
        if not delta and not seq.params.stream_blocks:
            return None
        return self._make_output(seq, delta, stream.released)

    def _make_output(self, seq: Sequence, delta: str, text: str, reason: FinishReason | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_ids,
            text=text,
            token_ids=seq.committed_prefix(),
            delta_text=delta,
            block=self._block_view(seq) if seq.params.stream_blocks else None,
            finished=reason is not None,
            finish_reason=reason,
            error=seq.error,
            stats=seq.stats,
        )

    def _block_view(self, seq: Sequence) -> BlockView:
        """The block the last step worked on (so a finished block shows with no masks left)."""
        index = seq.last_block
        start, end = seq.block_bounds(index)
        ids = seq.tokens[start:end].tolist()
        masked = [t == seq.mask_id for t in ids]
        pieces = ["" if m else self.tokenizer.decode([t], skip_special_tokens=True) for t, m in zip(ids, masked)]
        steps = seq.step if index == seq.block else seq.stats.steps_per_block[index]
        return BlockView(index=index, step=steps, token_ids=ids, masked=masked, pieces=pieces)

    def _finish(self, seq: Sequence, reason: FinishReason, delta: str = "") -> RequestOutput:
        """Free the sequence's pages and build its final output (flushing held-back text)."""
        stream = self.streams.pop(seq.request_id, None) or TextStream(self.tokenizer)
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            delta += stream.update(seq.committed_prefix(), final=True)
            if stream.stopped:
                reason = FinishReason.STOP
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        return self._make_output(seq, delta, stream.released, reason)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        log.exception("request %s failed in the engine", seq.request_id, exc_info=exc)
        seq.error = f"{type(exc).__name__}: {exc}"
        return self._finish(seq, FinishReason.ERROR)

    def _publish(self, stats: StepStats) -> None:
        for listener in self.step_listeners:
            try:
                listener(stats)
            except Exception:  # metrics must never break generation
                log.exception("step listener failed")
