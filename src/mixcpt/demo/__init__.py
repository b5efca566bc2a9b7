"""The embedded synthetic-knowledge demo (design.md §7)."""
