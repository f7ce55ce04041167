"""``python -m mechfix.cli``: the same as the ``mechfix`` command."""

from mechfix.cli import main

main()
