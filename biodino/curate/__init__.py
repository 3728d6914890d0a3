"""``biodino curate``: embedding-based curation of an image pool (near duplicates, example-based filtering,
cluster-balanced sampling), each step's result kept in the output folder so that a rerun resumes."""
