"""`python -m experiments.sweep` from a checkout: the installed `l2r-sweep` (see
`l2r.cli.sweep`)."""

from l2r.cli.sweep import main

if __name__ == "__main__":
    main()
