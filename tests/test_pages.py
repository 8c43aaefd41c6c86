"""The page allocator: page ids and the free list, without tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unmask.engine.pages import OutOfPagesError, PageAllocator


def test_allocate_takes_enough_pages_for_the_tokens():
    pages = PageAllocator(num_pages=8, page_size=4)
    assert len(pages.allocate(9)) == 3
    assert (pages.num_free, pages.num_used) == (5, 3)


def test_allocated_pages_are_distinct_ids_within_the_pool():
    pages = PageAllocator(num_pages=6, page_size=2)
    taken = pages.allocate(4) + pages.allocate(7)
    assert len(set(taken)) == len(taken) == 6
    assert all(0 <= p < 6 for p in taken)


def test_freed_pages_are_reused_first():
    pages = PageAllocator(num_pages=8, page_size=4)
    first = pages.allocate(8)
    pages.allocate(4)
    pages.free(first)
    assert pages.allocate(8) == first


def test_allocating_more_than_is_free_raises_and_takes_nothing():
    pages = PageAllocator(num_pages=2, page_size=4)
    with pytest.raises(OutOfPagesError):
        pages.allocate(9)
    assert pages.num_free == 2


def test_can_allocate_says_whether_the_pages_are_free():
    pages = PageAllocator(num_pages=2, page_size=4)
    assert pages.can_allocate(8) and not pages.can_allocate(9)


def test_an_empty_pool_is_refused():
    with pytest.raises(ValueError):
        PageAllocator(num_pages=0, page_size=4)


def test_the_allocator_and_the_scheduler_import_no_torch():
    code = "import sys, unmask.engine.pages, unmask.engine.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
