"""The process's umask for a test of file modes: what diana asks for, seen whatever the caller's umask."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["umask"]


@contextmanager
def umask(value: int) -> Iterator[None]:
    """The umask set to ``value`` while the block runs, then put back."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)
