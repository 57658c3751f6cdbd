"""Leaf helpers every layer may use: errors, paths, durable writes, photo intake, PNG metadata, locks,
threads, text. No torch, no store."""
