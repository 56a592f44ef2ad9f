"""What measures plans: accuracy under failures (evaluate), design-space sweeps (dse) and
failure-aware fine-tuning (finetune). Imports core and the zoo."""
