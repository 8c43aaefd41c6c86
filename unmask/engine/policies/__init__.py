"""Cache policies (active positions) and unmask policies (what a step commits), by request name.

A policy owns its needs (`requirements`, `policies.resources`), its state
(an unmask policy's `new_state`) and its parameters (`engine.method_params`).
"""

from unmask.engine.policies.block import BlockCache, BlockDualCache
from unmask.engine.policies.cache import CachePolicy, DualCache, PrefixCache
from unmask.engine.policies.dkv import DKVDecode, DKVGreedy
from unmask.engine.policies.dllm_cache import DLLMCache
from unmask.engine.policies.freecache import FreeCache
from unmask.engine.policies.guided import Guided
from unmask.engine.policies.joint_threshold import JointThreshold
from unmask.engine.policies.unmask import Factor, LowConfidence, RandomOrder, Threshold, UnmaskPolicy

CACHE_POLICIES: dict[str, CachePolicy] = {
    p.name: p
    for p in (
        CachePolicy(), PrefixCache(), DualCache(), DKVDecode(), DKVGreedy(), DLLMCache(), FreeCache(),
        BlockCache(), BlockDualCache(),
    )
}
UNMASK_POLICIES: dict[str, UnmaskPolicy] = {
    p.name: p for p in (LowConfidence(), RandomOrder(), Threshold(), Factor(), Guided(), JointThreshold())
}

__all__ = ["CACHE_POLICIES", "UNMASK_POLICIES", "CachePolicy", "UnmaskPolicy"]
