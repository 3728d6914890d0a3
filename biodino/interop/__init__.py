"""Interchange: training states read from any source, exports to biodino's, birder's and timm's formats."""
