"""The verbs: one module per user action, shared by the CLI, the DreamBench runner and the demo.

Each verb is a function ``verb(store, Request) -> Result`` over plain dataclasses that reports progress
as typed events (`base/events.py`) through a hook and raises `StencilError` for problems a user can fix
(`generate` instead yields each file as it saves it). Verbs never print and never name a
command-line flag; they call the ML core and the models layer, and they own the store's rows and files.
"""
