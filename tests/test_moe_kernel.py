"""The routed-experts kernel of `kernels/moe.py`: the reference against dense routing, the alignment's
invariants, and the Triton path against the reference.

The reference and alignment tests run everywhere (CI). The Triton tests carry
the `gpu` marker and run on CUDA; without a GPU they check the kernels' logic
through Triton's CPU interpreter (fp16 and fp32: its bf16 matrix product is broken):

    TRITON_INTERPRET=1 pytest --noconftest -m gpu tests/test_moe_kernel.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_fixtures import INTERPRETING, kernel_device  # noqa: F401  (pytest fixture)
from unmask.kernels.moe import (
    align_to_blocks,
    align_to_blocks_reference,
    align_to_blocks_triton,
    max_blocks,
    moe_experts,
    moe_experts_reference,
    moe_experts_triton,
    moe_tiles,
)
from unmask.kernels.silu_mul import silu_mul_reference

DTYPES = (torch.float16, torch.float32) if INTERPRETING else (torch.bfloat16, torch.float16, torch.float32)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _routing(tokens: int, experts: int, top_k: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct top-k experts per token and their normalised weights."""
    ids = torch.rand(tokens, experts).argsort(-1)[:, :top_k]
    weights = torch.rand(tokens, top_k).softmax(-1)
    return ids.to(device), weights.to(device)


def _experts(experts: int, dim: int, inter: int, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [E, 2I, D] and down [E, D, I], scaled so activations stay O(1)."""
    gate_up = torch.randn(experts, 2 * inter, dim) * dim**-0.5 * 2
    down = torch.randn(experts, dim, inter) * inter**-0.5
    return gate_up.to(dtype).to(device), down.to(dtype).to(device)


def _dense_routing(ids: torch.Tensor, weights: torch.Tensor, experts: int) -> torch.Tensor:
    """[T, E] float64: token t's weight for expert e, zero where e was not chosen."""
    routing = torch.zeros(ids.shape[0], experts, dtype=torch.float64, device=ids.device)
    return routing.scatter_add_(1, ids, weights.double())


def _dense_exact(x, gate_up, down, ids, weights) -> torch.Tensor:
    """float64: every expert on every token, combined through the dense routing matrix."""
    inter = down.shape[2]
    projected = torch.einsum("td,end->etn", x.double(), gate_up.double())
    hidden = F.silu(projected[..., :inter]) * projected[..., inter:]
    expert_out = torch.einsum("eti,edi->etd", hidden, down.double())
    return torch.einsum("te,etd->td", _dense_routing(ids, weights, gate_up.shape[0]), expert_out)


def _dense_in_dtype(x, gate_up, down, ids, weights) -> torch.Tensor:
    """Every expert on every token in x's dtype, weighted through the dense routing matrix in float32."""
    inter = down.shape[2]
    routing = _dense_routing(ids, weights, gate_up.shape[0]).float()
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(gate_up.shape[0]):
        projected = x @ gate_up[e].t()
        expert_out = silu_mul_reference(projected[:, :inter], projected[:, inter:]) @ down[e].t()
        out += routing[:, e, None] * expert_out.float()
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- reference (CPU, CI)


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 1), (9, 8, 2), (40, 16, 4), (33, 6, 6)])
def test_reference_matches_every_expert_weighted_by_a_dense_routing_matrix(tokens, experts, top_k):
    x = torch.randn(tokens, 48)
    gate_up, down = _experts(experts, 48, 24, torch.float32)
    ids, weights = _routing(tokens, experts, top_k)
    out = moe_experts_reference(x, gate_up, down, ids, weights)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert _rel_err(out, _dense_exact(x, gate_up, down, ids, weights)) < 1e-5


def test_reference_in_bf16_rounds_each_expert_as_a_bf16_loop_does():
    x = torch.randn(30, 64).to(torch.bfloat16)
    gate_up, down = _experts(8, 64, 32, torch.bfloat16)
    ids, weights = _routing(30, 8, 3)
    out = moe_experts_reference(x, gate_up, down, ids, weights)
    assert out.dtype == torch.bfloat16
    emulated = _dense_in_dtype(x, gate_up, down, ids, weights)
    # Same per-row GEMMs, roundings and float32 sum in expert order: equal to the bit.
    torch.testing.assert_close(out, emulated, rtol=0, atol=0)


def test_reference_reads_only_the_experts_that_received_tokens():
    x = torch.randn(5, 32)
    gate_up, down = _experts(8, 32, 16, torch.float32)
    ids, weights = torch.tensor([[0, 3]] * 5), torch.full((5, 2), 0.5)
    unused = [1, 2, 4, 5, 6, 7]
    gate_up[unused], down[unused] = float("nan"), float("nan")
    out = moe_experts_reference(x, gate_up, down, ids, weights)
    assert out.isfinite().all()


def test_reference_gradients_match_finite_differences():
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    gate_up, down = (w.double().requires_grad_() for w in _experts(3, 16, 8, torch.float32))
    ids, weights = _routing(4, 3, 2)
    weights = weights.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: moe_experts_reference(*a), (x, gate_up, down, ids, weights))


def test_reference_of_no_tokens_is_empty():
    gate_up, down = _experts(4, 16, 8, torch.float32)
    out = moe_experts_reference(torch.zeros(0, 16), gate_up, down, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 16)


def test_mismatched_shapes_are_rejected_with_the_shapes_named():
    gate_up, down = _experts(4, 16, 8, torch.float32)
    ids, weights = _routing(3, 4, 2)
    with pytest.raises(ValueError, match=r"gate_up \(4, 12, 16\)"):
        moe_experts_reference(torch.randn(3, 16), gate_up[:, :12], down, ids, weights)
    with pytest.raises(ValueError, match="topk_ids"):
        moe_experts_reference(torch.randn(3, 16), gate_up, down, ids[:2], weights[:2])


def test_dispatch_uses_the_reference_off_the_gpu():
    if INTERPRETING:
        pytest.skip("the interpreter sends CPU tensors to Triton")
    x = torch.randn(6, 32)
    gate_up, down = _experts(4, 32, 16, torch.float32)
    ids, weights = _routing(6, 4, 2)
    assert torch.equal(moe_experts(x, gate_up, down, ids, weights), moe_experts_reference(x, gate_up, down, ids, weights))


# ----------------------------------------------------------------------------- alignment (CPU, CI)


ROUTINGS = {
    "random": lambda: torch.randint(0, 10, (37, 3)),
    "one expert": lambda: torch.full((50, 2), 4),
    "one pair each": lambda: torch.arange(10).view(10, 1),
    "one past a block each": lambda: torch.arange(10).repeat_interleave(9).view(-1, 1),  # 9 = one block of 8 + 1
}


def _aligned(name: str, block_m: int = 8):
    ids = ROUTINGS[name]()
    return ids, align_to_blocks(ids, 10, block_m)


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_align_places_every_pair_once_in_a_block_of_its_expert(name):
    ids, blocks = _aligned(name)
    pairs = blocks.sorted_pairs.long()
    real = pairs < ids.numel()
    assert torch.equal(pairs[real].sort().values, torch.arange(ids.numel()))
    block_of_row = torch.arange(pairs.numel()) // blocks.block_m
    assert torch.equal(blocks.block_experts[block_of_row[real]].long(), ids.reshape(-1)[pairs[real]])


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_align_gives_each_expert_whole_blocks_in_expert_order(name):
    ids, blocks = _aligned(name)
    counts = torch.bincount(ids.reshape(-1), minlength=10)
    used = -(-counts // blocks.block_m)
    experts = blocks.block_experts.long()
    assert blocks.block_experts.numel() == max_blocks(ids.numel(), 10, blocks.block_m)
    assert torch.equal(experts[: int(used.sum())], torch.arange(10).repeat_interleave(used))
    assert (experts[int(used.sum()) :] == 10).all()  # the rest are marked as no expert


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_align_keeps_pair_order_within_an_expert_and_pads_only_its_last_block(name):
    ids, blocks = _aligned(name)
    rows = blocks.sorted_pairs.view(-1, blocks.block_m).long()
    for e in range(10):
        expert_rows = rows[blocks.block_experts == e].reshape(-1)
        expected = (ids.reshape(-1) == e).nonzero().squeeze(1)
        assert torch.equal(expert_rows[: expected.numel()], expected)
        assert (expert_rows[expected.numel() :] == ids.numel()).all()
        assert expert_rows.numel() - expected.numel() < blocks.block_m


def test_tiles_grow_with_the_rows_each_expert_gets():
    decode = moe_tiles(32 * 8, 256, torch.bfloat16)  # a 32-token step over LLaDA2-mini's experts
    prefill = moe_tiles(4096 * 8, 64, torch.bfloat16)
    assert decode.block_m == 16 and prefill.block_m == 64
    assert moe_tiles(32 * 8, 64, torch.float32).block_k < moe_tiles(32 * 8, 64, torch.bfloat16).block_k


# ----------------------------------------------------------------------------- Triton (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(ROUTINGS) + ["top-8 of 64", "top-8 of 256, few tokens", "top-8 of 256, many tokens"])
@pytest.mark.parametrize("block_m", [8, 16, 64])
def test_triton_alignment_equals_the_reference(kernel_device, name, block_m):
    ids, experts = {
        "top-8 of 64": lambda: (_routing(300, 64, 8)[0], 64),
        "top-8 of 256, few tokens": lambda: (_routing(5, 256, 8)[0], 256),
        "top-8 of 256, many tokens": lambda: (_routing(700, 256, 8)[0], 256),
    }.get(name, lambda: (ROUTINGS[name](), 10))()
    expected = align_to_blocks_reference(ids, experts, block_m)
    got = align_to_blocks_triton(ids.to(kernel_device), experts, block_m)
    assert torch.equal(got.sorted_pairs.cpu(), expected.sorted_pairs)
    assert torch.equal(got.block_experts.cpu(), expected.block_experts)


def _inputs(tokens, experts, top_k, dim, inter, dtype, device):
    x = torch.randn(tokens, dim).to(dtype).to(device)
    gate_up, down = _experts(experts, dim, inter, dtype, device)
    ids, weights = _routing(tokens, experts, top_k, device)
    return x, gate_up, down, ids, weights


def _tolerance(dtype: torch.dtype) -> float:
    # fp32 multiplies in full precision on both sides; in 16 bits one rounding of
    # an expert's output or activation lands on either side (attention's bound).
    return 1e-5 if dtype == torch.float32 else 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 64, 1000])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (64, 8), (256, 8)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference(kernel_device, tokens, experts, top_k, dtype):
    if INTERPRETING and (tokens == 1000 or (experts == 256 and tokens > 7)):
        pytest.skip("the interpreter is slow: small cases there")
    args = _inputs(tokens, experts, top_k, 128, 64, dtype, kernel_device)
    out = moe_experts_triton(*args)
    ref = moe_experts_reference(*args)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert _rel_err(out, ref) < _tolerance(dtype)
    # As close to the exact result as the reference, whose roundings it repeats.
    exact = _dense_exact(*(a.cpu() for a in args))
    assert _rel_err(out.cpu(), exact) <= 2 * _rel_err(ref.cpu(), exact) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference_with_each_tile_height(kernel_device, block_m, dtype):
    # moe_tiles picks the height from the rows per expert; each height must be right for any routing.
    tiles = moe_tiles(block_m * 16, 16, dtype)
    assert tiles.block_m == block_m
    args = _inputs(90, 16, 4, 96, 48, dtype, kernel_device)
    out = moe_experts_triton(*args, tiles=tiles)
    assert _rel_err(out, moe_experts_reference(*args)) < _tolerance(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_reads_only_the_experts_that_received_tokens(kernel_device, dtype):
    x, gate_up, down, ids, weights = _inputs(7, 64, 4, 64, 32, dtype, kernel_device)
    unused = torch.ones(64, dtype=torch.bool, device=kernel_device)
    unused[ids.reshape(-1)] = False
    gate_up[unused], down[unused] = float("nan"), float("nan")
    out = moe_experts_triton(x, gate_up, down, ids, weights)
    assert out.isfinite().all()
    assert _rel_err(out, moe_experts_reference(x, gate_up, down, ids, weights)) < _tolerance(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_masks_partial_tiles_and_honours_strides(kernel_device, dtype):
    # D and I are no multiple of any tile; x is a column slice of a wider tensor.
    x = torch.randn(45, 240).to(dtype).to(kernel_device)[:, 17:217]
    gate_up, down = _experts(12, 200, 72, dtype, kernel_device)
    ids, weights = _routing(45, 12, 3, kernel_device)
    out = moe_experts_triton(x, gate_up, down, ids, weights)
    assert _rel_err(out, moe_experts_reference(x, gate_up, down, ids, weights)) < _tolerance(dtype)


@pytest.mark.gpu
def test_triton_handles_every_token_on_one_expert(kernel_device):
    tokens = 150 if INTERPRETING else 3000
    x, gate_up, down, ids, weights = _inputs(tokens, 16, 2, 64, 32, torch.float32, kernel_device)
    ids[:, 0] = 5  # one expert gets every token: many blocks of one expert
    ids[:, 1] = torch.where(ids[:, 1] == 5, 6, ids[:, 1])
    out = moe_experts_triton(x, gate_up, down, ids, weights)
    assert _rel_err(out, moe_experts_reference(x, gate_up, down, ids, weights)) < 1e-5


@pytest.mark.gpu
def test_triton_of_no_tokens_is_empty(kernel_device):
    x, gate_up, down, ids, weights = _inputs(0, 8, 2, 32, 16, torch.float32, kernel_device)
    assert moe_experts_triton(x, gate_up, down, ids, weights).shape == (0, 32)


@pytest.mark.gpu
def test_dispatch_runs_triton_unless_gradients_are_needed(kernel_device):
    x, gate_up, down, ids, weights = _inputs(20, 8, 2, 64, 32, torch.float32, kernel_device)
    assert torch.equal(moe_experts(x, gate_up, down, ids, weights), moe_experts_triton(x, gate_up, down, ids, weights))
    out = moe_experts(x, gate_up, down, ids, weights.requires_grad_())
    out.sum().backward()
    assert weights.grad is not None and weights.grad.isfinite().all()


@pytest.mark.gpu
def test_triton_replays_from_a_cuda_graph_with_changing_routing(kernel_device):
    if kernel_device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    tokens, experts, top_k, dtype = 48, 64, 8, torch.bfloat16
    x, gate_up, down, ids, weights = _inputs(tokens, experts, top_k, 256, 128, dtype, kernel_device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        moe_experts(x, gate_up, down, ids, weights)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts(x, gate_up, down, ids, weights)
    routings = [_routing(tokens, experts, top_k, kernel_device) for _ in range(2)]
    skewed_ids = routings[0][0].clone()
    skewed_ids[:, 0] = 0
    skewed_ids[:, 1:] = torch.where(skewed_ids[:, 1:] == 0, experts - 1, skewed_ids[:, 1:])
    routings.append((skewed_ids, routings[0][1]))
    for new_ids, new_weights in routings:
        x.copy_(torch.randn_like(x))
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        graph.replay()
        assert _rel_err(out, moe_experts_reference(x, gate_up, down, ids, weights)) < 1e-2


@pytest.mark.gpu
def test_reference_refuses_cuda_graph_capture_with_a_clear_error(kernel_device):
    if kernel_device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    args = _inputs(16, 8, 2, 64, 32, torch.float64, kernel_device)  # float64: the dispatcher takes the reference
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            moe_experts(*args)
