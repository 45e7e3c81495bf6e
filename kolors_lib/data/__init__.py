"""Step 01: bring a dataset in (ModelScope MsDataset, the generated sample set or a local folder).
Writes data/raw/images + metadata.jsonl; start with data.importer.import_dataset."""
