"""`python -m xcoalesce_agent`, the same as the `xcoalesce-agent` command."""
import sys

from .cli import main

sys.exit(main())
