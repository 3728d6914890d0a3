"""Evaluation: embedding extraction and frozen-embedding evaluation."""
