"""Configuration, the ground floor: the schema (dataclasses), value ranges, recipe loading, shipped files."""
