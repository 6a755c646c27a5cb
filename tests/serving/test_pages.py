"""PagePool: allocation, reference counts, the prefix cache, and what an admission would take."""

import pytest

from mla_jax.serving.pages import OutOfPages, PagePool


def test_allocate_release_and_refcounts():
  pool = PagePool(4, page_size=2)
  a = pool.allocate(3)
  assert a == [0, 1, 2] and pool.num_free == 1 and pool.num_used == 3
  with pytest.raises(OutOfPages, match="2 pages needed, 1 free"):
    pool.allocate(2)
  assert pool.num_free == 1  # nothing taken
  pool.release(a[:2])
  assert pool.num_free == 3 and pool.refcount(0) == 0 and pool.refcount(2) == 1
  with pytest.raises(ValueError, match="double release"):
    pool.release([0])
  pool.check()


def test_a_prefix_is_matched_page_by_page_and_shared():
  pool = PagePool(8, page_size=2)
  first = pool.allocate(3)
  pool.register(first, [5, 6, 7, 8, 9])  # two full pages registered, the third is partial
  assert pool.match_prefix([5, 6, 7, 8, 1, 1]) == first[:2]
  assert pool.refcount(first[0]) == 2 and pool.refcount(first[2]) == 1
  assert pool.match_prefix([5, 6, 0, 0]) == first[:1]  # diverges in the second page
  assert pool.match_prefix([6, 5, 7, 8]) == []  # a page's key includes the one before it
  pool.check()


def test_free_pages_needed_counts_only_what_would_leave_the_free_pool():
  pool = PagePool(8, page_size=2)
  held = pool.allocate(2)
  pool.register(held, [1, 2, 3, 4])
  # 5 tokens: 3 pages; the first two are cached and held by another sequence: 1 new page.
  assert pool.free_pages_needed([1, 2, 3, 4, 9]) == 1
  pool.release(held)  # cached, held by nobody: taking them back uses up free pages too
  assert pool.num_free == 8 and pool.free_pages_needed([1, 2, 3, 4, 9]) == 3
  assert pool.free_pages_needed([7, 7, 7]) == 2
  no_sharing = PagePool(8, page_size=2, prefix_sharing=False)
  assert no_sharing.free_pages_needed([1, 2, 3, 4, 9]) == 3


def test_reset_prefix_cache_frees_cached_pages_and_keeps_held_ones():
  pool = PagePool(6, page_size=2)
  kept, dropped = pool.allocate(2), pool.allocate(2)
  pool.register(kept, [1, 2, 3, 4])
  pool.register(dropped, [5, 6, 7, 8])
  pool.release(dropped)
  assert pool.num_free == 4 and pool.match_prefix([5, 6]) == dropped[:1]
  pool.release(dropped[:1])
  pool.reset_prefix_cache()
  assert pool.match_prefix([5, 6]) == [] and pool.match_prefix([1, 2]) == []
  assert pool.num_free == 4 and pool.refcount(kept[0]) == 1
  pool.check()
  pool.release(kept)  # no longer a cached block: straight back to free
  assert pool.num_free == 6
  pool.check()


def test_copy_on_write_replaces_a_shared_page():
  pool = PagePool(4, page_size=2)
  mine = pool.allocate(1)
  pool.register(mine, [1, 2])
  theirs = pool.match_prefix([1, 2])
  pair = pool.copy_on_write(theirs, 0)
  assert pair == (mine[0], theirs[0]) and theirs[0] != mine[0]
  assert pool.refcount(mine[0]) == 1 and pool.refcount(theirs[0]) == 1
  pool.check()
