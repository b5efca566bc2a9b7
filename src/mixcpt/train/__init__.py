"""Stage 1: knowledge-mixture continual pre-training with logit swap self-distillation."""
