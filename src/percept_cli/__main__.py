"""``python -m percept_cli`` is the same as ``percept``."""

from .cli.app import main

main()
