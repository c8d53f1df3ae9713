"""`python -m afd` is the `afd` command."""
import sys

from .cli import main

sys.exit(main())
