"""Decoders: deformable.py (Deformable DETR, DINO), conditional.py, sam.py (SAM-DETR, SMCA),
decoupled.py (SD-DETR). Which base detector uses which is declared in ``models/bases.py``."""
