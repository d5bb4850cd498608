"""Scoring a quantized model against its float reference: perplexity, KL, agreement, greedy match."""
