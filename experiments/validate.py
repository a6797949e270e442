"""`python -m experiments.validate` from a checkout: the installed `l2r-validate` (see
`l2r.cli.validate`)."""

from l2r.cli.validate import main

if __name__ == "__main__":
    main()
