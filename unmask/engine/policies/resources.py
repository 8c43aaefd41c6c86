"""What policies may need from the engine, and how a policy declares that it needs it.

A policy lists its `requirements`; the engine refuses a request whose
policies' requirements its resources do not meet, with the requirement's own
advice. The engine loads the resources once, without knowing which policy
wants which (`PolicyResources.load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from unmask.engine.params import ParamError

if TYPE_CHECKING:
    from unmask.engine.config import EngineConfig
    from unmask.engine.models.loader import LoadedModel
    from unmask.engine.policies.guide import GuideRunner


@dataclass
class PolicyResources:
    """The engine's optional parts that some policies use."""

    guide: GuideRunner | None = None  # the small causal LM of `unmask=guided`
    feature_pages: bool = False  # the KV pages also hold per-layer features (`cache=dllm-cache`)

    @classmethod
    def load(cls, config: EngineConfig, loaded: LoadedModel) -> PolicyResources:
        """The resources that load with the model (call before sizing the KV pool, which takes what is left)."""
        from unmask.engine.policies.guide import load_guide

        return cls(guide=load_guide(config.guide_model, loaded))


@dataclass(frozen=True)
class Requirement:
    """A resource a policy cannot run without, and how to start an engine that has it."""

    what: str  # e.g. "a guide model"
    how: str  # e.g. "start the engine with guide_model=DIR (`unmask serve --guide-model DIR`)"
    met: Callable[[PolicyResources], bool]

    def check(self, field: str, policy: str, resources: PolicyResources) -> None:
        """Raise `ParamError` on `field` when `resources` lack this requirement."""
        if not self.met(resources):
            raise ParamError(field, f"{field}={policy!r} needs {self.what}: {self.how}")


FEATURE_PAGES = Requirement(
    "the pool's feature pages",
    "start the engine with feature_cache=True (`unmask serve --feature-cache`)",
    lambda r: r.feature_pages,
)
GUIDE_MODEL = Requirement(
    "a guide model",
    "start the engine with guide_model=DIR (`unmask serve --guide-model DIR`)",
    lambda r: r.guide is not None,
)
