"""``sinai`` console entry point (``python -m sinai``): a ctrl-C while the command line is still being
imported (torch takes seconds) is one line and exit code 130, as it is once a command runs."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted (ctrl-C) while starting; nothing was done\n")
        raise SystemExit(130) from None
    cli_main()


if __name__ == "__main__":
    main()
