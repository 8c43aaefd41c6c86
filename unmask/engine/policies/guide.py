"""The guide model behind `unmask=guided` (FlashDLM's Guided Diffusion, arXiv 2505.21467): the guided policy's resource.

A small autoregressive LM with the diffusion model's tokenizer checks the
diffusion model's proposals ("drafts") for the current block left to right,
the way a verifier checks a draft in speculative decoding: fed the committed
prefix and the drafts, it predicts each draft from the ones before it. A draft
is *agreed* when the guide ranks it among its top two tokens with at least
`guide_relative` of the top token's probability (the paper's "top-2 relative"
rule; `guide_relative=1` asks for the guide's own top token). The guided
unmask policy then commits the leading run of agreed drafts and, in place of
the first draft the guide rejects, the guide's own top token (its
*correction*), as speculative decoding does and as FlashDLM's implementation
does for every acceptance rule; so every step commits one token or more. A
correction is never the mask token or an id past the diffusion model's
vocabulary.

The guide keeps each request's KV over its committed prefix across steps, so
a step feeds it only the tokens committed since the last step and the new
drafts; all guided requests of an engine step share one batched forward
(pasts left-padded, new tokens right-padded, masked by the attention mask).
The guide is loaded with transformers from a local directory, never with
remote code.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from unmask.engine.models.arch import CheckpointError
from unmask.engine.bundled import bundled_model_dir
from unmask.engine.models.loader import LoadedModel, load_tokenizer
from unmask.engine.sequence import Sequence, UnmaskState

log = logging.getLogger("unmask.guide")

BUNDLED_GUIDE = bundled_model_dir("unmask-tiny-guide")
TOP_K = 2  # a draft must be among the guide's two most likely tokens (FlashDLM's top-2 relative rule)


@dataclass
class GuideState(UnmaskState):
    """One request's guide: KV over its first `length` positions, and this step's verdict."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer [kv_heads, length, head_dim]
    length: int = 0
    agreed: int | None = None  # leading drafts the guide agreed with at this step; None before it ran
    correction: int | None = None  # the guide's token for the first draft it rejected; None if it took them all


def guide_state(seq: Sequence) -> GuideState:
    """The sequence's guide state (the guided policy gives each of its sequences one; it ends with the sequence)."""
    if not isinstance(seq.unmask_state, GuideState):
        raise TypeError(f"request {seq.request_id} has no guide state: it uses unmask={seq.params.unmask!r}")
    return seq.unmask_state


@dataclass
class _Pending:
    """One request's part of a batched guide forward."""

    state: GuideState
    new_ids: torch.Tensor  # committed tokens not yet in the guide's KV, then the drafts but the last
    drafts: torch.Tensor
    first_draft_row: int  # row of `new_ids` whose output predicts the first draft
    relative: float


class GuideRunner:
    def __init__(self, model: PreTrainedModel, device: torch.device, mask_id: int, model_vocab: int):
        self.model = model
        self.device = device
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.mask_id, self.model_vocab = mask_id, model_vocab  # what a correction must never be
        # transformers 5 renamed `past_key_values` to `cache`; the project accepts both versions.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.tokens_fed = 0  # tokens run through the guide, for tests and metrics

    @classmethod
    def load(cls, guide_dir: str | Path, loaded: LoadedModel) -> "GuideRunner":
        """Load a local causal LM as the guide; it must share the diffusion model's tokenizer."""
        mismatch = tokenizer_mismatch(load_tokenizer(guide_dir), loaded.tokenizer, loaded.config.mask_token_id)
        if mismatch:
            raise CheckpointError(f"the guide model {str(guide_dir)!r} does not share the model's tokenizer: {mismatch}")
        if not hasattr(DynamicCache(), "layers"):
            raise CheckpointError("guided decoding needs transformers >= 4.56 (per-layer KV caches)")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(guide_dir), local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # transformers raises many types; the user needs one clear message
            raise CheckpointError(f"cannot load the guide model from {str(guide_dir)!r}: {exc}") from exc
        model = model.to(device=loaded.device, dtype=loaded.dtype).eval()
        runner = cls(model, loaded.device, loaded.config.mask_token_id, loaded.config.vocab_size)
        largest = max(i for i in loaded.tokenizer.get_vocab().values() if i != loaded.config.mask_token_id)
        if largest >= runner.vocab_size:
            raise CheckpointError(f"the guide model's {runner.vocab_size} embeddings miss token id {largest}")
        return runner

    @torch.inference_mode()
    def verify(self, items: list[tuple[Sequence, torch.Tensor]]) -> None:
        """Check each sequence's drafts for its current block's masked positions (in order, CPU).

        Sets every sequence's `GuideState.agreed` and `correction`, and keeps
        in its KV the committed prefix as it will stand once the policy has committed.
        """
        pending = [self._prepare(seq, drafts) for seq, drafts in items]
        for p in pending:
            p.state.agreed = p.state.correction = None  # stay None, for the policy to notice, if the forward fails
        logits, cache, past_len = self._forward(pending)
        for i, (p, (agreed, correction)) in enumerate(zip(pending, self._verdicts(pending, logits))):
            # Keep the KV of every position the policy commits but the last: the next
            # step feeds that one again, for its output predicts the next position
            # (and a corrected token's KV, computed from the rejected draft, is never kept).
            commits = agreed + (correction is not None)
            self._keep(p.state, cache, i, past_len, p.first_draft_row + commits)
            p.state.agreed, p.state.correction = agreed, correction

    def _verdicts(self, pending: list[_Pending], logits: torch.Tensor) -> list[tuple[int, int | None]]:
        """Each request's leading agreed drafts and its correction, from logits [B, K, V] of the last K new rows."""
        width = max(p.drafts.numel() for p in pending)
        first_kept = logits.shape[1] - max(p.new_ids.numel() for p in pending)  # <= 0: rows before it were dropped
        rows = torch.zeros(len(pending), width, dtype=torch.long)
        drafts = torch.zeros(len(pending), width, dtype=torch.long)
        valid = torch.zeros(len(pending), width, dtype=torch.bool)
        relative = torch.tensor([[p.relative] for p in pending])
        for i, p in enumerate(pending):
            n = p.drafts.numel()
            rows[i, :n] = p.first_draft_row + first_kept + torch.arange(n)
            drafts[i, :n], valid[i, :n] = p.drafts, True
        dev = logits.device
        picked = logits.gather(1, rows.to(dev)[:, :, None].expand(-1, -1, logits.shape[-1])).float()
        agreed = leading_agreement(picked, drafts.to(dev), relative.to(dev), valid.to(dev)).tolist()
        own = self._own_tokens(picked).tolist()  # last: it overwrites `picked`
        return [(a, own[i][a] if a < p.drafts.numel() else None) for i, (p, a) in enumerate(zip(pending, agreed))]

    def _own_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The guide's top token per row among those the diffusion model may commit (overwrites `logits`)."""
        logits[..., self.model_vocab :] = float("-inf")
        logits[..., self.mask_id] = float("-inf")
        return logits.argmax(-1)

    @staticmethod
    def _prepare(seq: Sequence, drafts: torch.Tensor) -> _Pending:
        state = guide_state(seq)
        first_masked = int(seq.masked_in_block()[0])
        # Guided commits left to right, so the block's masks are one run from `first_masked`.
        new_ids = torch.cat([seq.tokens[state.length : first_masked], drafts[:-1]])
        assert seq.params.guide_relative is not None
        return _Pending(state, new_ids, drafts, first_masked - 1 - state.length, seq.params.guide_relative)

    def _forward(self, pending: list[_Pending]) -> tuple[torch.Tensor, DynamicCache, int]:
        """One forward of all pending requests: logits [B, new, V], the padded KV and its past length."""
        past_len = max(p.state.length for p in pending)
        new_len = max(p.new_ids.numel() for p in pending)
        ids = torch.zeros(len(pending), new_len, dtype=torch.long)
        mask = torch.zeros(len(pending), past_len + new_len, dtype=torch.long)
        positions = torch.zeros(len(pending), new_len, dtype=torch.long)
        for i, p in enumerate(pending):
            n = p.new_ids.numel()
            # Ids past the guide's embeddings (the model's vocabulary padding, which only an
            # untrained model proposes) reach the guide as id 0 and are never agreed with.
            ids[i, :n] = torch.where(p.new_ids < self.vocab_size, p.new_ids, 0)
            mask[i, past_len - p.state.length : past_len + n] = 1  # pasts left-padded, new tokens right-padded
            positions[i] = p.state.length + torch.arange(new_len)
            self.tokens_fed += n
        cache = DynamicCache()
        for layer, (k, v) in enumerate(_padded_past(pending, past_len)):
            cache.update(k, v, layer)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            # Only rows from the earliest first draft on feed the verdicts (not a prompt's).
            logits_to_keep=new_len - min(p.first_draft_row for p in pending),
            **{self._cache_arg: cache},
        )
        return out.logits, cache, past_len

    @staticmethod
    def _keep(state: GuideState, cache: DynamicCache, index: int, past_len: int, new: int) -> None:
        """Store request `index`'s entries of the batch KV: its real past and its first `new` new ones."""
        start = past_len - state.length
        state.kv = [
            (layer.keys[index, :, start : past_len + new].clone(), layer.values[index, :, start : past_len + new].clone())
            for layer in cache.layers
        ]
        state.length += new


def _padded_past(pending: list[_Pending], past_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The requests' KV stacked per layer, [B, kv_heads, past_len, head_dim], each left-padded with zeros."""
    if not past_len:
        return []
    ref = next(p.state.kv for p in pending if p.state.kv)
    padded = []
    for layer, (k_ref, _) in enumerate(ref):
        k = k_ref.new_zeros(len(pending), k_ref.shape[0], past_len, k_ref.shape[2])
        v = torch.zeros_like(k)
        for i, p in enumerate(pending):
            if p.state.length:
                k[i, :, past_len - p.state.length :], v[i, :, past_len - p.state.length :] = p.state.kv[layer]
        padded.append((k, v))
    return padded


def leading_agreement(
    logits: torch.Tensor, drafts: torch.Tensor, relative: torch.Tensor | float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """How many leading drafts the guide agrees with: logits [..., n, V] predicting drafts [..., n].

    `relative` broadcasts against [..., 1]; rows where `valid` is False (padding) never agree.
    """
    probs = logits.softmax(-1)
    top_p, top_ids = probs.topk(TOP_K, dim=-1)
    known = drafts < probs.shape[-1]
    draft_p = probs.gather(-1, torch.where(known, drafts, 0)[..., None]).squeeze(-1)
    agree = known & (top_ids == drafts[..., None]).any(-1) & (draft_p >= relative * top_p[..., 0])
    if valid is not None:
        agree &= valid
    return agree.long().cumprod(-1).sum(-1)


def tokenizer_mismatch(guide: PreTrainedTokenizerBase, model: PreTrainedTokenizerBase, mask_id: int) -> str | None:
    """Why two tokenizers do not give the same ids to the same tokens (the mask aside), or None."""
    guide_vocab, model_vocab = guide.get_vocab(), model.get_vocab()
    for token, token_id in model_vocab.items():
        if token_id != mask_id and guide_vocab.get(token) != token_id:
            return f"token {token!r} is id {token_id} for the model and {guide_vocab.get(token)} for the guide"
    return None


def load_guide(guide_dir: str | None, loaded: LoadedModel) -> GuideRunner | None:
    """The engine's guide: `guide_dir` (which must load), or, when None, the bundled guide if it fits the model."""
    if guide_dir is not None:
        return GuideRunner.load(guide_dir, loaded)
    if not (BUNDLED_GUIDE / "config.json").is_file():
        return None
    try:
        return GuideRunner.load(BUNDLED_GUIDE, loaded)
    except CheckpointError as exc:
        log.info("guided decoding is off: %s", exc)
        return None
