"""Step 03: train a Kolors LoRA with DiffSynth's numerics on cached text and image encodings.
Writes lora/ (the LoRA, loss curve, validation images); start with train.training.train_lora."""
