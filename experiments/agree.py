"""`python -m experiments.agree` from a checkout: the installed `l2r-agree` (see
`l2r.cli.agree`)."""

from l2r.cli.agree import main

if __name__ == "__main__":
    main()
