"""`python -m experiments.run` from a checkout: the installed `l2r-run` (see `l2r.cli.run`)."""

from l2r.cli.run import main

if __name__ == "__main__":
    main()
