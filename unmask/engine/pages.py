"""The page allocator: which KV pages are free, and which a sequence holds.

Only page ids live here (no tensors, no torch): the scheduler admits against
this allocator, and the tensors that hold each page's K/V and features
(`engine.kv_pool.KVPool`, one per rank with tensor parallelism) are addressed
by the ids it hands out. A diffusion canvas never grows, so a sequence takes
every page it will need at admission and gives them all back when it ends.
"""

from __future__ import annotations


class OutOfPagesError(RuntimeError):
    """More pages were asked for than are free."""


class PageAllocator:
    """`num_pages` pages of `page_size` token slots each, handed out by id."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"the KV pool needs at least one page of one slot, got {num_pages} x {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # A stack: recently freed pages are reused first, which keeps them warm in cache.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        """Reserve the pages for `num_tokens` positions, or raise `OutOfPagesError`."""
        n = self.pages_for(num_tokens)
        if n > len(self._free):
            raise OutOfPagesError(f"{n} pages needed, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
