"""The quick-start demo: a real panorama on a fresh checkout, in a time that suits the machine.

    python scripts/demo.py [CLI options]        (scripts/demo makes the environment, then this)

What it does: `syncdiffusion.cli.demo`.
"""

import sys

from syncdiffusion.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
