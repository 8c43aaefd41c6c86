"""The step loop: plan, execute, commit, then the outputs.

The scheduler plans a step (which sequences, each one's work as its cache
policy answers it), the runner executes the plan (one forward, one proposal
per masked position), and each sequence commits what its unmask policy
chooses (`Sequence.commit`). The engine names no policy: it checks a
request's policies' requirements and calls their hooks.

`LLMEngine` is synchronous and single-threaded; `AsyncEngine` drives it from
its own thread for the server and `LLM` drives it for offline use.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from unmask.engine.attention_pattern import block_layout, check_attention_fit, model_defaults
from unmask.engine.checkpoint_defaults import checkpoint_defaults, read_generation_config, resolve_block_start
from unmask.engine.config import EngineConfig
from unmask.engine.cuda_graphs import build_graph_runner
from unmask.engine.detokenizer import TextStream
from unmask.engine.errors import EngineDeadError
from unmask.engine.infill import CanvasLayout, Infill, cannot_infill, lay_out
from unmask.engine.kv_pool import KVPool
from unmask.engine.logprobs import chosen_logprobs, output_logprobs
from unmask.engine.models.loader import LoadedModel, check_engine_quantization, load_model
from unmask.engine.outputs import BlockView, FinishReason, RequestOutput, StepStats
from unmask.engine.pages import PageAllocator
from unmask.engine.parallel import ShardLoader, TensorParallelGroup
from unmask.engine.params import ParamError, SamplingParams, check_logprobs, check_text
from unmask.engine.policies import CACHE_POLICIES, UNMASK_POLICIES
from unmask.engine.policies.block_start import block_start_commit
from unmask.engine.policies.joint_threshold import check_edit_fit
from unmask.engine.policies.resources import PolicyResources
from unmask.engine.policies.unmask import Drafts
from unmask.engine.runner import ModelRunner
from unmask.engine.runner_interface import Proposals, Runner
from unmask.engine.sampling import RowGroup
from unmask.engine.scheduler import Scheduler, SchedulerLimits
from unmask.engine.scoring import ScoringJob
from unmask.engine.sequence import BlockLayout, Commit, Sequence, sequence_length
from unmask.engine.work import SequenceWork, plan_work
from unmask.kernels.confidence import precompile_fused_confidence

log = logging.getLogger("unmask.engine")

StepListener = Callable[[StepStats], None]
Outcome = tuple[Sequence, Commit | Exception]  # a sequence's step: what it committed, or why it failed


@dataclass
class Executed:
    """A plan as the runner executed it: the work that ran, its proposals, and the sequences that failed."""

    work: list[SequenceWork]
    tokens: torch.Tensor  # proposed token per logit row, work in order (CPU)
    confidence: torch.Tensor
    failures: list[Outcome] = field(default_factory=list)  # the sequences whose forward failed, with the exception

    def rows(self, i: int) -> slice:
        """The logit rows of `work[i]`."""
        return slice(self._offsets[i], self._offsets[i + 1])

    def __post_init__(self) -> None:
        self._offsets = [0, *itertools.accumulate(w.logit_positions.numel() for w in self.work)]


def build_kv_tensors(loaded: LoadedModel, config: EngineConfig) -> KVPool:
    """The KV (and feature) tensors of as many pages as the explicit budget, or the device's free memory, holds."""
    budget = config.kv_cache_bytes(loaded.device)
    return KVPool.from_budget(loaded.config, budget, config.page_size, loaded.dtype, loaded.device, config.feature_cache)


class LLMEngine:
    """The engine; with `tensor_parallel_size` > 1 it is rank 0 of a tensor-parallel group.

    `loaded` is a model already in memory (one device only), used as it is
    (`config.quantization` applies to the models the engine loads itself); `shards` gives each
    tensor-parallel rank its shard (default: slices of `config.model_dir`).
    Call `close()` when done with a tensor-parallel engine: it stops the workers.
    """

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, shards: ShardLoader | None = None):
        self.config = config
        if loaded is None and shards is None:
            check_engine_quantization(config)  # before tensor-parallel workers start (given shards check their own)
        self.parallel = TensorParallelGroup(config, shards) if config.tensor_parallel_size > 1 else None
        try:
            self._load(loaded)
        except BaseException:
            self.close()
            raise
        limits = SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting)
        self.pool = PageAllocator(self.runner.num_pages, config.page_size)  # page ids; the runner holds their tensors
        shift = self.model_config.logits_shift
        self.scheduler: Scheduler[SequenceWork] = Scheduler(self.pool, limits, lambda seq: plan_work(seq, shift))
        self.streams: dict[str, TextStream] = {}
        self.step_listeners: list[StepListener] = []

    def _load(self, loaded: LoadedModel | None) -> None:
        """The model, the policies' resources and the runner with its KV tensors (with tensor parallelism: rank 0's shares)."""
        config = self.config
        if self.parallel is not None:
            loaded = self.parallel.loaded
        self.loaded = loaded or load_model(
            config.model_dir, config.dtype, config.device, config.load_format, config.quantization
        )
        self.model_config = self.loaded.config
        # The server's defaults completed by the checkpoint's own (its family's schedule, its generation
        # config) and, for a block-causal model, its attention pattern's (its blocks, cache and rules).
        generation_config = read_generation_config(config.model_dir)
        checkpoint = checkpoint_defaults(config.defaults, self.model_config.arch, generation_config)
        self.defaults = model_defaults(checkpoint, self.model_config)
        self.tokenizer = self.loaded.tokenizer
        # Before the KV tensors, which take what memory is left.
        self.resources = PolicyResources.load(config, self.loaded)
        self.runner: Runner
        if self.parallel is not None:
            self.runner = self.parallel.start()
        else:
            kv = build_kv_tensors(self.loaded, config)
            self.runner = ModelRunner(self.loaded, kv, build_graph_runner(self.loaded.model, kv, config))
            # Proposals are made here (tensor-parallel ranks reduce split logits instead).
            precompile_fused_confidence(self.model_config.vocab_size, self.loaded.dtype, self.loaded.device)
        self.resources.feature_pages = self.runner.has_features

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one device); no step runs after it."""
        if self.parallel is not None:
            self.parallel.close()

    # --- requests -------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return min(self.model_config.max_position, self.pool.capacity_tokens)

    def make_sequence(self, request_id: str, prompt: str | list[int] | Infill, params: SamplingParams) -> Sequence:
        """Tokenize and validate a request without touching engine state (safe from any thread).

        An `Infill` prompt sets the canvas (its spans and the pieces between them) and
        the fixed suffix; its `max_tokens` is the canvas length.
        """
        infill: CanvasLayout | None = None
        if isinstance(prompt, Infill):
            infill = lay_out(prompt, self.encode, self.model_config.mask_token_id)
            params = replace(params, max_tokens=len(infill.canvas))
        resolved = resolve_block_start(params.resolve(self.defaults), self.model_config.arch)
        prompt_ids = self._prompt_ids(infill.prompt if infill else prompt)
        fixed_text = infill is not None and infill.has_fixed_text
        self._check_support(resolved, fixed_text)
        # Without fixed text an infill is plain generation: its canvas is all masks, its suffix empty.
        canvas_ids, suffix_ids = (infill.canvas, infill.suffix) if fixed_text else (None, [])
        if resolved.logprobs is not None and infill is not None and len(infill.spans) > 1:
            # Commit-time logprobs describe generated tokens; the text between spans is given, not generated.
            raise ParamError("logprobs", "logprobs are not available for an infill of more than one span")
        cfg, blocks = self.model_config, block_layout(self.model_config)
        self._check_context(len(prompt_ids), resolved.max_tokens, len(suffix_ids), blocks)
        seed = resolved.seed if resolved.seed is not None else secrets.randbits(63)
        unmask = UNMASK_POLICIES[resolved.unmask]
        if unmask.edits(resolved):
            check_edit_fit(resolved, CACHE_POLICIES[resolved.cache], blocks)
        return Sequence(
            request_id, prompt_ids, resolved, cfg.mask_token_id, cfg.eos_token_id, seed,
            unmask_state=unmask.new_state(), layout=blocks, canvas_ids=canvas_ids, suffix_ids=suffix_ids,
            editing=unmask.edits(resolved),
        )

    def encode(self, text: str) -> list[int]:
        """Text to token ids, as prompts are tokenized (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_context(self, prompt_len: int, max_tokens: int, suffix_len: int, blocks: BlockLayout | None) -> None:
        """Refuse a request whose sequence (with a block-causal model's last block completed) overflows the context.

        Checked before the canvas exists, so an absurd `max_tokens` allocates nothing.
        """
        total = prompt_len + max_tokens + suffix_len
        length = sequence_length(prompt_len, max_tokens, blocks) + suffix_len
        if length > self.max_model_len:
            with_suffix = f" + suffix ({suffix_len})" if suffix_len else ""
            aligned = f" (with the last block completed: {length})" if length > total else ""
            raise ParamError(
                "max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}){with_suffix} = {total}{aligned} exceeds "
                f"the model's context of {self.max_model_len} tokens",
            )

    def _check_support(self, params: SamplingParams, fixed_text: bool) -> None:
        """Refuse a request this engine cannot serve: logprobs from an unmask policy that may replace the
        model's proposals, methods that do not fit the model's attention, a block-start rule its unmask
        policy does not allow, fixed text its policies cannot keep (infill), or a resource this engine
        was started without."""
        unmask = UNMASK_POLICIES[params.unmask]
        if params.logprobs is not None and not unmask.keeps_proposals:  # a request error before a server one
            raise ParamError(
                "logprobs",
                f"logprobs are not available with unmask={unmask.name!r}: it may commit a token other than the model's proposal",
            )
        check_attention_fit(params, self.model_config, fixed_text)
        if params.block_start == "first" and not unmask.allows_block_start:
            raise ParamError("block_start", f"block_start='first' cannot be combined with unmask={unmask.name!r}")
        for kind, policy in (("cache", CACHE_POLICIES[params.cache]), ("unmask", unmask)):
            if fixed_text and not policy.infills:
                raise cannot_infill(kind, policy.name)
            for requirement in policy.requirements:
                requirement.check(kind, policy.name, self.resources)

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

    # --- prompt scoring (engine.scoring) ------------------------------------------
    def make_scoring_job(self, request_id: str, prompt: str | list[int], top_k: int) -> ScoringJob:
        """Tokenize and check a prompt to score (safe from any thread); `run_scoring` computes it."""
        if self.parallel is not None:
            raise ParamError("logprobs", "prompt logprobs (echo with logprobs) are not supported with tensor parallelism")
        check_logprobs(top_k)
        ids = self._prompt_ids(prompt)
        limit = min(self.config.max_score_tokens, self.model_config.max_position)
        if len(ids) > limit:
            raise ParamError(
                "prompt",
                f"the prompt has {len(ids)} tokens; prompt logprobs (echo with logprobs) are computed for prompts of at "
                f"most {limit} tokens (scoring costs one forward pass per prompt token)",
            )
        return ScoringJob(request_id, ids, top_k)

    def run_scoring(self, job: ScoringJob) -> None:
        """Score the job's next chunk of positions (one step's token budget)."""
        job.run_chunk(self.loaded.model, self.model_config, self.loaded.device, self.config.max_num_batched_tokens)

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
        plan = self.scheduler.schedule()
        if not plan:
            return []
        start = time.perf_counter()
        executed = self._execute(plan)
        commits = self._commit(executed)
        outputs = self._outputs(executed.failures + commits)
        self._publish(self._step_stats(plan, executed, commits, start))  # after the outputs freed their pages
        return outputs

    def _execute(self, plan: list[SequenceWork]) -> Executed:
        """Run the plan and propose tokens; if it fails, rerun each sequence alone so only the culprit fails.

        An `EngineDeadError` (a tensor-parallel group failed) is no request's fault: it propagates.
        """
        for w in plan:
            w.seq.record_work(w.recomputed)
        try:
            return Executed(plan, *self._propose(plan))
        except EngineDeadError:
            raise
        except Exception as exc:
            if len(plan) == 1:
                return Executed([], torch.empty(0, dtype=torch.long), torch.empty(0), [(plan[0].seq, exc)])
            log.warning("batched step failed (%s); isolating the failing request", exc)
        ok, proposals, failures = [], [], []
        for w in plan:
            try:
                proposals.append(self._propose([w]))
                ok.append(w)
            except EngineDeadError:
                raise
            except Exception as exc:
                failures.append((w.seq, exc))
        tokens = torch.cat([p[0] for p in proposals]) if proposals else torch.empty(0, dtype=torch.long)
        confidence = torch.cat([p[1] for p in proposals]) if proposals else torch.empty(0)
        return Executed(ok, tokens, confidence, failures)

    def _propose(self, work: list[SequenceWork]) -> Proposals:
        groups = [self._row_group(w) for w in work]
        proposals = self.runner.propose(work, groups)
        for w, group in zip(work, groups):  # filled only for requests that ask for logprobs
            w.row_logprobs = group.logprobs
        return proposals

    @staticmethod
    def _row_group(w: SequenceWork) -> RowGroup:
        policy = UNMASK_POLICIES[w.seq.params.unmask]
        return RowGroup(w.seq.params, w.seq.generator, w.logit_positions, policy.random_confidence)

    def _commit(self, executed: Executed) -> list[Outcome]:
        """Let each unmask policy prepare its sequences' proposals, then commit what it chooses, sequence by sequence.

        One request's failure must not take the batch down: it is returned in place of its commit.
        """
        self._prepare(executed)
        commits: list[Outcome] = []
        for i, w in enumerate(executed.work):
            rows = executed.rows(i)
            try:
                commits.append((w.seq, self._commit_sequence(w, executed.tokens[rows], executed.confidence[rows])))
            except Exception as exc:
                commits.append((w.seq, exc))
        return commits

    def _commit_sequence(self, w: SequenceWork, tokens: torch.Tensor, confidence: torch.Tensor) -> Commit:
        """Commit the proposals (one per `w.targets`) that the block-start rule, else the unmask policy, chooses."""
        chosen = block_start_commit(w.seq, w.targets)
        if chosen is None:
            chosen = UNMASK_POLICIES[w.seq.params.unmask].select(w.seq, w.targets, tokens, confidence)
        committed = tokens[chosen]
        return w.seq.commit(w.targets[chosen], committed, chosen_logprobs(w.row_logprobs, chosen, committed))

    def _prepare(self, executed: Executed) -> None:
        """Each preparing unmask policy's one batched look at its sequences' proposals (`UnmaskPolicy.prepare`)."""
        drafts: dict[str, Drafts] = {}
        for i, w in enumerate(executed.work):
            if UNMASK_POLICIES[w.seq.params.unmask].prepares:
                drafts.setdefault(w.seq.params.unmask, []).append((w.seq, executed.tokens[executed.rows(i)]))
        for name, items in drafts.items():
            try:
                UNMASK_POLICIES[name].prepare(items, self.resources)
            except Exception:  # its requests then fail in their commit; the others go on
                log.exception("unmask=%s failed to prepare its step", name)

    def _outputs(self, commits: list[Outcome]) -> list[RequestOutput]:
        """Each sequence's output of the step: its final one when it failed or finished, else its news (if any)."""
        outputs = []
        for seq, commit in commits:
            try:
                out = self._fail(seq, commit) if isinstance(commit, Exception) else self._output(seq)
            except Exception as exc:
                out = self._fail(seq, exc)
            if out is not None:
                outputs.append(out)
        return outputs

    def _step_stats(
        self, plan: list[SequenceWork], executed: Executed, commits: list[Outcome], start: float
    ) -> StepStats:
        done = [c for _, c in commits if isinstance(c, Commit)]
        return StepStats(
            batch_size=len(plan),
            active_tokens=sum(w.recomputed for w in executed.work),  # of the sequences that ran
            tokens_committed=sum(c.tokens for c in done),
            step_seconds=time.perf_counter() - start,
            pages_in_use=self.pool.num_used,
            pages_total=self.pool.num_pages,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            policies=[(w.seq.params.cache, w.seq.params.unmask) for w in plan],
            finished_blocks=[c.finished_block_steps for c in done if c.finished_block_steps is not None],
        )

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
        token_ids = seq.committed_prefix()
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_ids,
            text=text,
            token_ids=token_ids,
            delta_text=delta,
            block=self._block_view(seq) if seq.params.stream_blocks else None,
            finished=reason is not None,
            finish_reason=reason,
            error=seq.error,
            stats=seq.stats,
            logprobs=output_logprobs(seq, len(token_ids)) if reason in (FinishReason.STOP, FinishReason.LENGTH) else None,
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
        seq.finish(reason)
        return self._make_output(seq, delta, stream.released, reason)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        log.exception("request %s failed in the engine", seq.request_id, exc_info=exc)
        seq.finish(FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
        return self._finish(seq, FinishReason.ERROR)

    def _publish(self, stats: StepStats) -> None:
        for listener in self.step_listeners:
            try:
                listener(stats)
            except Exception:  # metrics must never break generation
                log.exception("step listener failed")
