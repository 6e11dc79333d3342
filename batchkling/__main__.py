"""``python -m batchkling`` runs the command line."""

from batchkling.cli import main

main()
