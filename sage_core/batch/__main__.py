"""`python -m sage_attention_pack.sage_core.batch`: the same as the `sage-batch` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
