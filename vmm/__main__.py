"""`python -m vmm` is the `pyvmm` command."""

from vmm.cli import main

main()
