"""Data: shard packing and curation, WebDataset reading, multi-crop augmentation."""
