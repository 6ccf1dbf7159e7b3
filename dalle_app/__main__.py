"""`python -m dalle_app "a prompt" --out grid.png`: see dalle_app/cli.py."""

import sys

from dalle_app.cli import main

sys.exit(main())
