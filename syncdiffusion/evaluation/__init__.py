"""The paper's evaluation of a folder of panoramas: the crops, the coherence figures (Intra-LPIPS,
Intra-Style-L, CLIP-S), fidelity (FID, KID, Mean-GIQA) and the report (`scripts/evaluate.py`)."""
