"""Interchange: training states read from any source, exports to biodino's and birder's formats."""
