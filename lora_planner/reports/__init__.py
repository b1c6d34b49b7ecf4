"""Markdown capacity and validation reports."""
