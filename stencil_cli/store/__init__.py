"""The store: subjects, photos, runs and images in SQLite (sqlite-utils) with their files beside it."""
