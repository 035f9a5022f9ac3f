"""Sparse Fine-Tuning (SFT): trains ``deltahub.SparseDelta`` objects. Depends on deltahub, never the reverse."""
