"""Stage 2, format alignment: select k samples of the general pool by perplexity, then SFT and
DPO."""
