"""meld-clara's application layer: MELD data, fine-tuning, zero-shot, sweeps and reports."""
