"""Validation: runners, comparison and reports."""
