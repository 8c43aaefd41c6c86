"""Cache policies (active positions) and unmask policies (what a step commits), by request name."""

from engine.policies.cache import CachePolicy, DualCache, PrefixCache
from engine.policies.dkv import DKVDecode, DKVGreedy
from engine.policies.dllm_cache import DLLMCache
from engine.policies.freecache import FreeCache
from engine.policies.guided import Guided
from engine.policies.unmask import Factor, LowConfidence, RandomOrder, Threshold, UnmaskPolicy

CACHE_POLICIES: dict[str, CachePolicy] = {
    p.name: p for p in (CachePolicy(), PrefixCache(), DualCache(), DKVDecode(), DKVGreedy(), DLLMCache(), FreeCache())
}
UNMASK_POLICIES: dict[str, UnmaskPolicy] = {
    p.name: p for p in (LowConfidence(), RandomOrder(), Threshold(), Factor(), Guided())
}

__all__ = ["CACHE_POLICIES", "UNMASK_POLICIES", "CachePolicy", "UnmaskPolicy"]
