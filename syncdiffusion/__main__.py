"""`python -m syncdiffusion`: the command line (`syncdiffusion.cli.generate`)."""

from .cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
