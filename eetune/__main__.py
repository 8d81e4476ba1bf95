"""`python -m eetune ...`: the same CLI as the `eetune` command."""

from eetune.cli import main

main()
