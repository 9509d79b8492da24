"""The paper's comparison: MultiDiffusion (sync_weight 0) against SyncDiffusion (sync_weight 20)
on 512x3072 panoramas, a reference set of single 512x512 pictures, and the table.

    python scripts/reproduce_paper.py --per-prompt K [--out DIR] [--prompts FILE] [--clip]
    accelerate launch [--num_processes N] scripts/reproduce_paper.py --per-prompt K ...

What it makes and how each figure is computed: `syncdiffusion.cli.paper`.
"""

import sys
from pathlib import Path

from syncdiffusion.cli.paper import main

if __name__ == "__main__":
    sys.exit(main(default_prompts=Path(__file__).with_name("paper_prompts.txt")))
