"""Free text for those who may not know who the client is: the client's own names, replaced by their
pseudonym.

A supervisor reads a session note with the client pseudonymised, but the note says "Liam reported a better
week". For every view that pseudonymises the client, each string the caller is shown in clear is searched
for the client's names (the fields marked `client_name: true` in their own record: first, last, preferred)
and every whole-word occurrence, in any case, becomes the pseudonym. What this cannot catch is said in the
README: nicknames and misspellings, relatives' and places' names, initials, a name split across fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy.errors import GatewayError
from proxy.keys.ring import BoundedCache
from proxy.policy import values_at
from proxy.upstream import Upstream

NOTHING_TO_SCRUB = re.compile(r"(?!)")  # a client with no names on record: nothing to replace
_WORD = re.compile(r"\w{2,}")


def names_pattern(names: Iterable[Any]) -> re.Pattern[str]:
    """Every name, and every word of two letters or more in it, as whole words in any case."""
    words: set[str] = set()
    for name in names:
        if isinstance(name, str) and name.strip():
            words.add(name.strip())
            words.update(_WORD.findall(name))
    if not words:
        return NOTHING_TO_SCRUB
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


class ClientNames:
    """Each client's names, as patterns to scrub with: read from their own record as it passes through the
    gateway, or fetched from the CRM when a response about them needs scrubbing; held briefly, in memory."""

    def __init__(self, upstream: Upstream, size: int = 10_000, seconds: float = 60.0) -> None:
        self.upstream = upstream
        self._cache: BoundedCache[str, re.Pattern[str]] = BoundedCache(size, seconds)

    def pattern(self, client_id: str) -> re.Pattern[str] | None:
        """The client's pattern, or None when their names are not known (their free text is then removed)."""
        return self._cache.get(client_id)

    def observe(self, client_id: str, record: dict[str, Any], paths: Sequence[str]) -> None:
        if paths:
            self._cache.put(client_id, names_pattern(v for p in paths for v in values_at(record, p)))

    async def fetch(self, client_ids: Iterable[str], record_path: Callable[[str], str] | None,
                    paths: Sequence[str]) -> None:
        """Read the names of clients not cached from their records (`record_path`: the path of a client's
        record, from their id)."""
        if not paths or record_path is None:
            return
        for client_id in client_ids:
            if self._cache.get(client_id) is not None:
                continue
            try:
                record = await self.upstream.get_json(record_path(client_id))
            except GatewayError:
                continue  # unknown names: that client's free text is removed, not shown unscrubbed
            if isinstance(record, dict):
                self.observe(client_id, record, paths)

    def forget(self, client_id: str) -> None:
        self._cache.drop(client_id)
