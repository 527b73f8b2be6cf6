"""Paths that may be local or cloud URIs (s3://, gs://, file://): pure string functions, no I/O.

Imported by the flag definitions, so they stay free of heavy imports (the CLI answers --help fast).
"""
from __future__ import annotations

import os


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (s3://bucket/x, gs://..., file:///...) rather than a local path."""
    return "://" in str(path)


def join_path(base: str, *parts: str) -> str:
    """Join local paths and URIs (s3://bucket/x) alike."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def absolute(path: str) -> str:
    """Local paths made absolute (workers may run elsewhere); URIs unchanged."""
    return path if is_uri(path) else os.path.abspath(path)


def storage_default(name: str) -> str:
    """`name` under $CFFA_STORAGE (a shared or cloud prefix, set on cluster nodes), else a local folder."""
    root = os.environ.get("CFFA_STORAGE")
    return join_path(root, name) if root else name
