"""The store: subjects, photos, runs and images in SQLite (sqlite-utils) with their files beside it.

    db.py           Store, the one handle the verbs use, made of the query groups below; open_store
    connection.py   opening (read-write or read-only), write transactions, SQLite errors explained
    subjects.py     subjects and their photos            runs.py     training runs
    generations.py  generated images                     drafts.py   the draft-prompt cache
    config.py       the stored config                    upkeep.py   clean, repair, missing files
    records.py      Subject, Run, Generation, AddResult  layout.py   every file and folder name in the store
    migrations.py   the schema, one function per change  sqlite.py   sqlite-utils, imported without numpy
    settings.py     flag > environment > stored config > default

Nothing here imports torch.
"""
