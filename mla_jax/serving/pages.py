"""Host-side page bookkeeping: which pages are free, who holds each, and the prefix cache.

The device pools (mla_jax/paged_cache.py) hold num_pages pages of page_size token slots per
layer; this module decides which page ids a sequence gets. A page is in exactly one state:

  free       never used, or released and holding nothing worth keeping;
  cached     released, but holding a registered full block of tokens that a later prompt with
             the same prefix can take back (least recently released is evicted first);
  held       referenced by refcount >= 1 sequences.

Prefix cache (vLLM's automatic prefix caching, block by block): a full page is keyed by its
tokens and its parent block's id, so a key names the whole prefix up to it with no hash that
could collide; a new prompt takes the longest run of cached full pages at its start.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterable, Optional, Sequence


class OutOfPages(Exception):
  """Raised when an allocation needs more pages than are free; nothing was taken."""

  def __init__(self, needed: int, free: int):
    super().__init__(f"{needed} pages needed, {free} free")
    self.needed, self.free = needed, free


def _check_size(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
  return value


class PagePool:
  """Page ids 0 .. num_pages-1: allocation, reference counts and the prefix cache.

  Block keys: (parent block id, tuple of the page's tokens), parent -1 for a sequence's first
  page; each registered key gets a fresh block id. Raises ValueError for sizes that are not
  positive integers and for releasing a page nobody holds."""

  def __init__(self, num_pages: int, page_size: int, *, prefix_sharing: bool = True):
    self.num_pages = _check_size("num_pages", num_pages)
    self.page_size = _check_size("page_size", page_size)
    self.prefix_sharing = prefix_sharing
    self._free: collections.deque[int] = collections.deque(range(num_pages))
    self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
    self._refs = [0] * num_pages
    self._block_of_key: dict[tuple, int] = {}  # block key -> block id
    self._page_of_block: dict[int, int] = {}  # block id -> the page holding it
    self._block_of_page: dict[int, tuple[int, tuple]] = {}  # page -> (block id, key)
    self._ids = itertools.count()

  @property
  def num_free(self) -> int:
    """Pages an allocation can take: free ones and cached ones nobody holds."""
    return len(self._free) + len(self._cached)

  @property
  def num_used(self) -> int:
    """Pages held by at least one sequence."""
    return self.num_pages - self.num_free

  def pages_for(self, num_tokens: int) -> int:
    """Pages that num_tokens tokens occupy: ceil(num_tokens / page_size)."""
    return -(-num_tokens // self.page_size)

  def refcount(self, page: int) -> int:
    return self._refs[page]

  def allocate(self, n: int) -> list[int]:
    """n pages, each held once; free pages first, then the least recently released cached
    ones (their blocks leave the prefix cache). Raises OutOfPages, taking nothing, when fewer
    than n are free."""
    if n > self.num_free:
      raise OutOfPages(n, self.num_free)
    pages = []
    for _ in range(n):
      if self._free:
        page = self._free.popleft()
      else:
        page, _ = self._cached.popitem(last=False)
        self._forget(page)
      self._refs[page] = 1
      pages.append(page)
    return pages

  def release(self, pages: Iterable[int]) -> None:
    """Drops one reference to each page; a page nobody holds any more stays cached if it holds
    a registered block, else it is free. Raises ValueError for a page nobody held."""
    pages = list(pages)
    for page in pages:
      if self._refs[page] <= 0:
        raise ValueError(f"page {page} released but nobody holds it (a double release)")
    for page in pages:
      self._refs[page] -= 1
      if self._refs[page] == 0:
        if page in self._block_of_page:
          self._cached[page] = None
        else:
          self._free.append(page)

  def _prefix_pages(self, tokens: Sequence[int]) -> list[int]:
    """The pages holding the longest run of cached full pages at the start of `tokens`."""
    pages, parent = [], -1
    if not self.prefix_sharing:
      return pages
    for start in range(0, len(tokens) - self.page_size + 1, self.page_size):
      block = self._block_of_key.get((parent, tuple(tokens[start:start + self.page_size])))
      if block is None:
        break
      pages.append(self._page_of_block[block])
      parent = block
    return pages

  def match_prefix(self, tokens: Sequence[int]) -> list[int]:
    """The cached pages of the longest run of full pages at the start of `tokens`, each now
    held once more (a cached page nobody held is taken back). [] without prefix sharing."""
    pages = self._prefix_pages(tokens)
    for page in pages:
      if self._refs[page] == 0:
        del self._cached[page]
      self._refs[page] += 1
    return pages

  def free_pages_needed(self, tokens: Sequence[int]) -> int:
    """How many of the free pages (num_free) holding all of `tokens` would take: a page each,
    less the cached prefix pages other sequences already hold (match_prefix shares those
    without touching the free ones). Changes nothing."""
    shared = sum(self._refs[page] > 0 for page in self._prefix_pages(tokens))
    return self.pages_for(len(tokens)) - shared

  def register(self, pages: Sequence[int], tokens: Sequence[int]) -> None:
    """Records that the sequence with page table `pages` holds `tokens` (its first
    len(tokens) tokens): each full page becomes a cached block a later prompt can match. A
    block already cached under another page keeps that page. No-op without prefix sharing."""
    if not self.prefix_sharing:
      return
    parent = -1
    for index in range(min(len(tokens) // self.page_size, len(pages))):
      page = pages[index]
      key = (parent, tuple(tokens[index * self.page_size:(index + 1) * self.page_size]))
      block = self._block_of_key.get(key)
      if block is None:
        if page in self._block_of_page:  # this page already holds another block: stop here
          return
        block = next(self._ids)
        self._block_of_key[key] = block
        self._page_of_block[block] = page
        self._block_of_page[page] = (block, key)
      parent = block

  def reset_prefix_cache(self) -> None:
    """Forgets every cached block (pages nobody holds become free; held pages stay held but
    no longer match a prompt), as vLLM's reset_prefix_cache: so a repeated benchmark run does
    not find its own prompts cached."""
    for page in list(self._block_of_page):
      self._forget(page)
    self._free.extend(self._cached)
    self._cached.clear()

  def copy_on_write(self, pages: list[int], index: int) -> Optional[tuple[int, int]]:
    """Before a sequence writes into pages[index]: if that page is shared, or holds a cached
    block (whose tokens must stay what its key says), a fresh page replaces it in `pages` and
    (old, new) is returned for the caller to copy on the device; else None. Raises OutOfPages,
    changing nothing, when no page is free."""
    page = pages[index]
    if self._refs[page] == 1 and page not in self._block_of_page:
      return None
    (new,) = self.allocate(1)
    self.release([page])
    pages[index] = new
    return page, new

  def _forget(self, page: int) -> None:
    """Removes the block a page holds from the prefix cache (the page is being reused)."""
    block, key = self._block_of_page.pop(page)
    del self._block_of_key[key]
    del self._page_of_block[block]

  def check(self) -> None:
    """Raises AssertionError unless every page is in exactly one state and the prefix cache
    maps only to pages that hold its blocks (the tests call it after every operation)."""
    free, cached = set(self._free), set(self._cached)
    held = {p for p in range(self.num_pages) if self._refs[p] > 0}
    assert len(free) == len(self._free), "a page is twice in the free list"
    assert not (free & cached) and not (free & held) and not (cached & held), "page in 2 states"
    assert free | cached | held == set(range(self.num_pages)), "a page is in no state"
    assert all(r >= 0 for r in self._refs), "negative refcount"
    assert all(p in self._block_of_page for p in cached), "a cached page holds no block"
    for page, (block, key) in self._block_of_page.items():
      assert self._page_of_block[block] == page and self._block_of_key[key] == block
    assert len(self._block_of_key) == len(self._page_of_block) == len(self._block_of_page)
