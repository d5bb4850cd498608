"""`python -m edgepack` entry point."""

from __future__ import annotations

from edgepack.cli import main

if __name__ == "__main__":
    main()
