"""Step 04: render the story's panels with the LoRA (best-of-N, strength sweep, img2img, LLM drafts).
Writes storyboard/ (panels, grid, manifest); start with storyboard.storyboard.render_storyboard."""
