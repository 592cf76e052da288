"""`python -m imgflow`: the console script without the installed entry point."""

from imgflow.app.cli import main

main()
