"""Decoding defaults that come from the checkpoint: its family's schedule and its `generation_config.json`.

A Dream checkpoint decodes as Dream's `diffusion_generate` does unless told
otherwise: Dream's timestep schedule (`schedule=dream`), and from the
checkpoint's `generation_config.json` (read when present) the fields

- `alg`: `maskgit_plus` -> `confidence=prob`, `topk_margin` -> `margin`, `entropy` -> `entropy`
  (`origin`, which commits positions at random, has no counterpart and is ignored);
- `alg_temp` -> `alg_temp`;
- `eps` -> `schedule_eps`.

A server option changes these only when it differs from the built-in default
(`EngineDefaults()`), so an explicit `--confidence` wins over the checkpoint.
LLaDA checkpoints keep LLaDA's even schedule; their reference reads no
generation config. A LLaDA2 checkpoint commits as its reference generation
does: `unmask=joint_threshold` with `threshold=0.95` (every masked token of the
block whose confidence is above it, at least the most confident one per step;
`policies.joint_threshold`), without editing unless a request asks for it. Under Fast-dLLM's caches (`prefix`, `dual`) with
`unmask=threshold`, a Dream request commits each block's first position as
Fast-dLLM's Dream code does (`block_start=first`, see `policies.block_start`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from unmask.engine.params import EngineDefaults, SamplingParams

log = logging.getLogger("unmask.engine")

DREAM_ALGS = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "entropy"}
FAST_DLLM_CACHES = ("prefix", "dual")
LLADA2_DEFAULTS = {"unmask": "joint_threshold", "threshold": 0.95}  # LLaDA2's reference generate()


def read_generation_config(model_dir: str | Path) -> dict:
    """The checkpoint's `generation_config.json` as a dict ({} when absent or unreadable)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_defaults(defaults: EngineDefaults, arch: str, generation_config: dict) -> EngineDefaults:
    """`defaults` with the checkpoint family's schedule and, for Dream, its generation config applied."""
    if defaults.schedule == "auto":
        defaults = replace(defaults, schedule="dream" if arch == "dream" else "llada")
    if arch == "llada2":
        return _where_unset(defaults, LLADA2_DEFAULTS)
    if arch != "dream":
        return defaults
    found = {
        "confidence": DREAM_ALGS.get(generation_config.get("alg")),
        "alg_temp": _number(generation_config.get("alg_temp")),
        "schedule_eps": _number(generation_config.get("eps")),
    }
    return _where_unset(defaults, found)


def _where_unset(defaults: EngineDefaults, found: dict) -> EngineDefaults:
    """`defaults` with each found value (not None) for the fields the server left at their built-in value."""
    builtin = EngineDefaults()
    unset = {
        name: value
        for name, value in found.items()
        if value is not None and getattr(defaults, name) == getattr(builtin, name)
    }
    return replace(defaults, **unset)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def resolve_block_start(params: SamplingParams, arch: str) -> SamplingParams:
    """Make `block_start=auto` concrete: Fast-dLLM's rule for Dream under its caches with `threshold`."""
    if params.block_start != "auto":
        return params
    fast_dllm = arch == "dream" and params.cache in FAST_DLLM_CACHES and params.unmask == "threshold"
    return replace(params, block_start="first" if fast_dllm else "confidence")
