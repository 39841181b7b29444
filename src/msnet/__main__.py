"""`python -m msnet ...` (used by torchrun)."""

from msnet.cli import main

if __name__ == "__main__":
    main()
