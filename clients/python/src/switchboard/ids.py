"""Message ids: ``{ms}-{seq}``, compared as the pair (ms, seq)."""

from __future__ import annotations


def parse_id(message_id: str) -> tuple[int, int]:
    """``"1764000000000-3"`` -> ``(1764000000000, 3)``; ``ValueError`` when
    it is not of that form."""
    ms, sep, seq = message_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"not a message id: {message_id!r}")
    return int(ms), int(seq)


def compare_ids(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is before, equal to or after ``b``."""
    pa, pb = parse_id(a), parse_id(b)
    return (pa > pb) - (pa < pb)
