"""Data sets: turn a public release into one memory-mappable table, and load it as image classes."""
