"""Training: `train` runs LongLoRA fine-tuning through the transformers Trainer (`config` is what it takes, `setup`
builds model and data, `trainer_parts` the Trainer's pieces, `loss`, `precision`, `checkpoints`, `tracking`,
`sequence_parallel`, `provenance`), `launch` starts it on many devices, `smoke` runs the whole chain once. This package
imports nothing, so reading `engine.training.config` does not pay for torch."""
