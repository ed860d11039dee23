"""Entry point for `python -m bncli`."""

from bncli.cli import main

if __name__ == "__main__":
    main()
