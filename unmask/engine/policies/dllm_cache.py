"""dLLM-Cache (arXiv 2506.06295): long-interval prompt refresh, adaptive partial response update.

With t the request's steps taken so far, Kp = `dllm_prompt_refresh`,
Kr = `dllm_response_refresh` and rho = `dllm_rho`:

- t % Kp == 0: the prompt is recomputed (otherwise its K/V and features are reused);
- t % Kr == 0: every response (canvas) position is recomputed at every layer;
- otherwise every response position enters the forward, and each layer
  recomputes the floor(rho * response length) of them whose value vectors
  moved most since they were cached (V-verify, `engine.feature_cache`); the
  others reuse their cached attention and FFN outputs.

Active positions are therefore the prompt (at prompt refreshes) and the
whole response; the per-layer choice is the `FeatureUse` answer. The
features live in the pool's feature pages, so the engine must be started
with `feature_cache=True`.
"""

from __future__ import annotations

import torch

from unmask.engine.feature_cache import FeatureUse
from unmask.engine.policies.cache import CachePolicy
from unmask.engine.policies.resources import FEATURE_PAGES
from unmask.engine.sequence import Sequence


class DLLMCache(CachePolicy):
    name = "dllm-cache"
    requirements = (FEATURE_PAGES,)
    full_attention_only = True
    reads_suffix_window = False

    @staticmethod
    def _refreshes(seq: Sequence) -> tuple[bool, bool]:
        """(prompt refreshed, response refreshed) at this step."""
        p, t = seq.params, seq.steps_taken
        assert p.dllm_prompt_refresh is not None and p.dllm_response_refresh is not None
        return t % p.dllm_prompt_refresh == 0, t % p.dllm_response_refresh == 0

    def is_refresh(self, seq: Sequence) -> bool:
        return all(self._refreshes(seq))

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        prompt, _ = self._refreshes(seq)
        return torch.arange(0 if prompt else seq.prompt_len, seq.length)

    def features(self, seq: Sequence) -> FeatureUse:
        _, response = self._refreshes(seq)
        if response:
            return FeatureUse(torch.empty(0, dtype=torch.long), keep=0)
        verify = torch.arange(seq.prompt_len, seq.length)
        assert seq.params.dllm_rho is not None
        return FeatureUse(verify, keep=int(seq.params.dllm_rho * verify.numel()))
