"""One sampling contract: the Gumbel noise of (seed, position, token id), the same on every path.

The CPU tests compare the PyTorch paths (the fused path's reference, the
general path, batching). The `gpu` tests compare the Triton kernel with them:
on CUDA, or on the CPU under TRITON_INTERPRET=1 (see tests/test_kernels.py).
Tokens are compared, not distributions. Where the kernel and PyTorch may
round a key differently (fp32 logarithms), a differing token is accepted only
if the reference ranks the two tokens' keys within rounding of each other.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_fixtures import INTERPRETING, kernel_device  # noqa: F401  (pytest fixture)

from unmask.engine.params import EngineDefaults, SamplingParams
from unmask.engine.sampling import RowGroup, min_p_filter, propose_batch, top_k_filter, top_p_filter
from unmask.kernels._triton import HAS_TRITON, tl, triton
from unmask.kernels.confidence import fused_confidence_reference, fused_confidence_triton
from unmask.kernels.noise import SEED_BITS, _bits, gumbel_bits, gumbel_from_bits, gumbel_keys, gumbel_noise, row_keys

MASK = 0
KEY_TOLERANCE = 1e-5  # relative: a few fp32 roundings of a key l / T + g


def assert_same_tokens_up_to_rounding(tokens: torch.Tensor, want: torch.Tensor, keys: torch.Tensor) -> None:
    """`tokens` == `want`, except in rows where the reference keys of the two tokens are within rounding."""
    tokens, want, keys = tokens.cpu(), want.cpu(), keys.cpu()
    for row in (tokens != want).nonzero().flatten().tolist():
        got, expected = float(keys[row, tokens[row]]), float(keys[row, want[row]])
        assert abs(got - expected) <= KEY_TOLERANCE * max(1.0, abs(expected)), (
            f"row {row}: token {int(tokens[row])} (key {got}) instead of {int(want[row])} (key {expected})"
        )


def group(params: SamplingParams, seed: int, positions: torch.Tensor, random_confidence: bool = False) -> RowGroup:
    """A request's rows in a step; a fresh generator per call, so equal seeds draw equal step seeds."""
    return RowGroup(params.resolve(EngineDefaults()), torch.Generator().manual_seed(seed), positions, random_confidence)


def sampled(**fields) -> SamplingParams:
    return SamplingParams(max_tokens=16, block_length=16, temperature=1.0, **fields)


# --- the noise itself -------------------------------------------------------------------------------


def test_row_keys_depend_on_the_seed_and_the_position_only():
    seeds, positions = torch.tensor([7, 7, 8, 2**31 - 1]), torch.tensor([3, 4, 3, 3])
    keys = row_keys(seeds, positions)
    assert len(set(keys.tolist())) == 4 and bool((keys >= 0).all())
    assert torch.equal(keys, row_keys(seeds.clone(), positions.clone()))


def test_the_noise_is_standard_gumbel_and_uncorrelated_between_neighbours():
    keys = row_keys(torch.arange(200), torch.arange(200) % 13)
    g = gumbel_noise(keys, torch.arange(5000)).double()
    euler_gamma = 0.5772156649
    assert abs(g.mean().item() - euler_gamma) < 0.01
    assert abs(g.var().item() - math.pi**2 / 6) < 0.02
    next_token = torch.corrcoef(torch.stack([g[:, :-1].flatten(), g[:, 1:].flatten()]))[0, 1]
    next_row = torch.corrcoef(torch.stack([g[:-1].flatten(), g[1:].flatten()]))[0, 1]
    assert abs(next_token) < 0.01 and abs(next_row) < 0.01


def test_sampling_a_row_draws_from_its_tempered_softmax():
    rows, temperature = 20000, 0.7
    base = torch.randn(6)
    keys = row_keys(torch.arange(rows), torch.zeros(rows, dtype=torch.long))
    tokens = gumbel_keys(base.repeat(rows, 1), torch.full((rows,), temperature), keys).argmax(-1)
    freq = torch.bincount(tokens, minlength=6).double() / rows
    assert (freq - (base.double() / temperature).softmax(-1)).abs().max() < 4 * math.sqrt(0.25 / rows)


def test_a_shifted_vocabulary_slice_has_the_same_noise_as_the_whole_row():
    keys = row_keys(torch.tensor([5, 6]), torch.tensor([10, 11]))
    logits = torch.randn(2, 40)
    whole = gumbel_keys(logits, torch.ones(2), keys)
    assert torch.equal(gumbel_keys(logits[:, 25:], torch.ones(2), keys, first_token=25), whole[:, 25:])


# --- every PyTorch path samples the same tokens -----------------------------------------------------


def test_the_general_path_samples_the_fused_paths_tokens():
    logits = torch.randn(12, 300) * 2
    positions = torch.arange(20, 32)
    fused, _ = propose_batch(logits.clone(), [group(sampled(), 9, positions)], MASK)
    for confidence in ("margin", "entropy"):
        general, _ = propose_batch(logits.clone(), [group(sampled(confidence=confidence), 9, positions)], MASK)
        assert torch.equal(general, fused), confidence


def test_top_p_keeps_the_unfiltered_token_wherever_it_lies_in_the_nucleus():
    logits = torch.randn(40, 300) * 3
    positions = torch.arange(40)
    fused, _ = propose_batch(logits.clone(), [group(sampled(), 4, positions)], MASK)
    nucleus, _ = propose_batch(logits.clone(), [group(sampled(top_p=0.8), 4, positions)], MASK)
    masked = logits.clone()
    masked[:, MASK] = float("-inf")
    inside = (top_p_filter(masked, 0.8) > float("-inf")).gather(1, fused[:, None]).squeeze(1)
    assert inside.any() and not inside.all()
    assert torch.equal(nucleus[inside], fused[inside])


@pytest.mark.parametrize(
    "fields,keeps",
    [({"top_k": 20}, lambda l: top_k_filter(l, 20)), ({"min_p": 0.05}, lambda l: min_p_filter(l, 0.05))],
    ids=["top_k", "min_p"],
)
def test_top_k_and_min_p_keep_the_unfiltered_token_wherever_they_keep_it(fields, keeps):
    logits = torch.randn(40, 300) * 3
    positions = torch.arange(40)
    fused, _ = propose_batch(logits.clone(), [group(sampled(), 4, positions)], MASK)
    filtered, _ = propose_batch(logits.clone(), [group(sampled(**fields), 4, positions)], MASK)
    masked = logits.clone()
    masked[:, MASK] = float("-inf")
    kept = keeps(masked) > float("-inf")
    inside = kept.gather(1, fused[:, None]).squeeze(1)
    assert inside.any() and not inside.all()
    assert torch.equal(filtered[inside], fused[inside])
    assert kept.gather(1, filtered[:, None]).all()


def test_asking_for_logprobs_samples_the_fused_paths_tokens():
    logits = torch.randn(12, 300) * 2
    positions = torch.arange(20, 32)
    fused, _ = propose_batch(logits.clone(), [group(sampled(), 9, positions)], MASK)
    recorded = group(sampled(logprobs=3), 9, positions)
    general, _ = propose_batch(logits.clone(), [recorded], MASK)
    assert torch.equal(general, fused)
    assert recorded.logprobs is not None and recorded.logprobs.top_ids.shape == (12, 3)


def test_a_request_samples_the_same_tokens_alone_or_batched_with_others():
    logits = torch.randn(10, 200) * 2
    mine = group(sampled(), 3, torch.arange(40, 44))
    alone, _ = propose_batch(logits[3:7].clone(), [mine], MASK)
    others = [group(sampled(confidence="margin"), 1, torch.arange(3)), group(SamplingParams(max_tokens=16), 2, torch.arange(3))]
    batch = [others[0], group(sampled(), 3, torch.arange(40, 44)), others[1]]
    batched, _ = propose_batch(logits.clone(), batch, MASK)
    assert torch.equal(batched[3:7], alone)


def test_the_noise_follows_the_position_not_the_row():
    logits = torch.zeros(1, 500)  # flat: the token is the noise's argmax alone
    first, _ = propose_batch(logits.clone(), [group(sampled(), 3, torch.tensor([40]))], MASK)
    same, _ = propose_batch(logits.clone(), [group(sampled(), 3, torch.tensor([40]))], MASK)
    moved = [propose_batch(logits.clone(), [group(sampled(), 3, torch.tensor([p]))], MASK)[0] for p in range(41, 45)]
    assert torch.equal(first, same) and any(not torch.equal(first, m) for m in moved)


# --- the Triton kernel samples PyTorch's tokens ------------------------------------------------------


@triton.jit
def _noise_kernel(keys_ptr, bits_ptr, gumbel_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < vocab
    bits = gumbel_bits(tl.load(keys_ptr + row), cols)
    tl.store(bits_ptr + row * vocab + cols, bits.to(tl.int64), mask=ok)
    tl.store(gumbel_ptr + row * vocab + cols, gumbel_from_bits(bits), mask=ok)


@pytest.mark.gpu
def test_the_triton_noise_bits_are_pytorchs_bits(kernel_device):
    keys = torch.cat([row_keys(torch.arange(6) * 7919, torch.arange(6)), torch.tensor([0, 2**63 - 1])])
    vocab = 1000
    bits = torch.empty(keys.numel(), vocab, dtype=torch.long, device=kernel_device)
    gumbel = torch.empty(keys.numel(), vocab, dtype=torch.float32, device=kernel_device)
    _noise_kernel[(keys.numel(),)](keys.to(kernel_device), bits, gumbel, vocab, BLOCK=1024)
    assert torch.equal(bits.cpu(), _bits(keys, torch.arange(vocab)))
    torch.testing.assert_close(gumbel.cpu(), gumbel_noise(keys, torch.arange(vocab)), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("num_chunks", [1, 3])
def test_the_confidence_kernel_samples_the_references_tokens(kernel_device, num_chunks):
    rows, vocab = (16, 6000) if INTERPRETING else (512, 126464)
    logits = (torch.randn(rows, vocab) * 3).to(torch.bfloat16)
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0]).repeat(rows // 4)
    keys = row_keys(torch.arange(rows) * 104729, torch.arange(rows) % 37)
    want, want_conf = fused_confidence_reference(logits, temperature, keys)
    got, conf = fused_confidence_triton(logits.to(kernel_device), temperature.to(kernel_device), keys.to(kernel_device), num_chunks)
    reference_keys = torch.where(temperature[:, None] > 0, gumbel_keys(logits, temperature.clamp_min(1e-6), keys), logits.float())
    assert_same_tokens_up_to_rounding(got, want, reference_keys)
    same = got.cpu() == want
    torch.testing.assert_close(conf.cpu()[same], want_conf[same], rtol=1e-4, atol=0)


@pytest.mark.gpu
def test_a_step_proposes_the_same_tokens_on_the_gpu_as_on_the_cpu():
    if not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("compares the CUDA kernels with the CPU paths")
    logits = torch.randn(64, 4096) * 3
    groups = lambda: [  # noqa: E731 - fresh generators for each run
        group(sampled(), 1, torch.arange(16)),
        group(sampled(confidence="margin"), 2, torch.arange(100, 116)),
        group(SamplingParams(max_tokens=16, temperature=0.6, top_p=0.9), 3, torch.arange(8, 24)),
        group(sampled(top_k=50, min_p=0.01, logprobs=2), 4, torch.arange(200, 216)),
    ]
    cpu, _ = propose_batch(logits.clone(), groups(), MASK)
    gpu, _ = propose_batch(logits.cuda(), groups(), MASK)
    masked = logits.clone()
    masked[:, MASK] = float("-inf")
    step_seeds = [int(torch.randint(2**SEED_BITS, (1,), generator=g.generator)) for g in groups()]
    keys = torch.cat([row_keys(torch.full((g.rows,), s), g.positions) for g, s in zip(groups(), step_seeds)])
    assert_same_tokens_up_to_rounding(gpu, cpu, gumbel_keys(masked, torch.ones(64), keys))
