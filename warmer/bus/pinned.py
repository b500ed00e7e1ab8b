"""The client versions the bus's patches were written for.

``lenient``, ``reader``, ``flow`` and ``wire`` reach into aiormq's and pamqp's internals;
each refuses to run on a version it was not checked against, rather than misbehave on it.
"""

from __future__ import annotations

from importlib.metadata import version


def check_pinned(pinned: dict[str, str], who: str, check: str = "it") -> None:
    """RuntimeError unless each package's installed version starts with its prefix;
    ``check``: what to check against the new version before updating ``PINNED``."""
    for package, prefix in pinned.items():
        found = version(package)
        if not found.startswith(prefix):
            raise RuntimeError(
                f"{who} was written for {package} {prefix}x, found {found}: check {check} "
                "against the new version and its tests, then update PINNED"
            )


__all__ = ["check_pinned"]
