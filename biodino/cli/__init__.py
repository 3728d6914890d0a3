"""The biodino command line."""
