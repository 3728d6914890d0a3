"""Distribution applied from outside the model: the FSDP2 strategy and the function that shards a network."""
