"""`python -m refsnn ...` is the `refsnn` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="refsnn")
