"""Step 02: clean the raw images with a Data-Juicer recipe (filters, dedup, aesthetic score, captions).
Writes data/clean/train (DiffSynth's layout) and a report; start with clean.pipeline.filter_dataset."""
