"""Download the model weights into a weights folder (see weights/README.md).

Usage: python scripts/download_weights.py [--model NAME] [--controlnet NAME] [--weights DIR]

The command itself: `syncdiffusion.cli.download`.
"""

import sys

from syncdiffusion.cli.download import main

if __name__ == "__main__":
    sys.exit(main())
