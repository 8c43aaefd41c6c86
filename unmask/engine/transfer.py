"""Copies between the host and the model's device that do not stall the host.

A blocking host-to-device copy waits for everything queued before it on the
stream; in the middle of a step that is the whole forward pass, after which the
host still has kernels to launch while the GPU idles. So index tensors go over
through pinned memory, asynchronously, and a step's results come back with one
wait: the single host synchronisation of a step.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for a GPU is copied asynchronously from pinned memory."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    # Straight from the caching host allocator (`pin_memory()` would first ask CUDA whether the tensor is
    # pinned); the block is reused only after the copy is done (the allocator records the copy's stream).
    pinned = torch.empty_like(tensor, pin_memory=True).copy_(tensor)
    return pinned.to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors on the CPU, after one wait for the stream of the first (a GPU's) rather than one per tensor."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    copies = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory, queued on the stream
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return copies
