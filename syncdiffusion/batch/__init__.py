"""Many panoramas, one model load per process, on every device a launcher gives:

    python -m syncdiffusion.batch JOBS --out DIR [--weights DIR] [--model NAME]
    python -m syncdiffusion.batch --prompts FILE --seeds 0-99 --set sync_weight=0,20 --out DIR
    accelerate launch [--num_processes N] -m syncdiffusion.batch ...
    torchrun --nproc_per_node N -m syncdiffusion.batch ...

JOBS is JSON Lines: one request a line, its inputs by name (`inputs.panorama_inputs`); the model's
defaults fill in the rest. An `image` and its `mask` are files by path (relative to JOBS's folder),
and a LoRA a hub id, an https URL or a file. Each job's file is named by a short hash of its
resolved request (an image by its pixels' hash; a LoRA by its source, so a LoRA file changed in
place is not seen as a new job) and the model (`job_key`), so a rerun of the same command finds what
is done and makes only the rest. A file is written under a temporary name in DIR and renamed when
whole, so a run killed at any moment never leaves a half-written file under a job's name. Each
process appends to its own index part (DIR/.index/); the main process merges them into
DIR/index.jsonl, one line per job in JOBS order: its file and seconds, or its error. A bad line is
that job's error and the other jobs still run. One run writes in DIR at a time: its main process
holds DIR/.lock (the system's flock, which ends with the process however it ends) and another run
into DIR is refused, naming the one that holds it.

The jobs are split between processes by their position among those not yet done; every job is
seeded by its own inputs, so the pictures are the same whatever the number of processes. With
several machines, DIR must be one shared folder.
"""
