from __future__ import annotations

from slmops.cli import main

main()
