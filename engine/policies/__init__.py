"""Cache policies (active positions) and unmask policies (what a step commits)."""

from engine.policies.cache import CACHE_POLICIES, CachePolicy
from engine.policies.unmask import UNMASK_POLICIES, UnmaskPolicy

__all__ = ["CACHE_POLICIES", "UNMASK_POLICIES", "CachePolicy", "UnmaskPolicy"]
