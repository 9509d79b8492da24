"""Coherence report: the SyncDiffusion paper's metrics for a folder of panoramas.

    python scripts/evaluate.py DIR [--weights weights] [--json PATH]
                               [--clip [--clip-model DIR] [--prompt TEXT]] [--reference DIR]

What each figure is and how it is computed: `syncdiffusion.evaluation.report`.
"""

import sys

from syncdiffusion.evaluation.report import main

if __name__ == "__main__":
    sys.exit(main())
