"""``python -m interlock`` runs the CLI."""

from interlock.cli.main import main

main()
