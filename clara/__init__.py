"""CLARA: a CLIP-style audio-text contrastive model (checkpoint-compatible with the reference)."""
