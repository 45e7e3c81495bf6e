"""Step 06: publish the LoRA with its model card, samples, prompts and a ComfyUI workflow to ModelScope.
Writes publish/ and uploads it; start with publishing.publish.publish."""
