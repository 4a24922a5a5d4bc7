"""``python -m edgetl.cli``."""

from edgetl.cli import main

main()
