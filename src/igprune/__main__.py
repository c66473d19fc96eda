"""`python -m igprune` runs the CLI."""

from igprune.cli import main

main()
