"""``python -m sinai.cli``."""

from . import main

main()
