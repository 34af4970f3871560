"""``python -m cvft.cli ...``: the ``cvft`` command."""

from cvft.cli.dispatch import main

main()
