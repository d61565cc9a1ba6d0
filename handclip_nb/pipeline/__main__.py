"""``python -m handclip_nb.pipeline``: the demo, a grid, or one grid run (see ``cli``)."""
import sys

from .cli import main

sys.exit(main())
