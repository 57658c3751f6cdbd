"""The stored config: `stencil config set KEY VALUE` values (`settings.resolve_setting` reads them)."""

from __future__ import annotations

from stencil_cli.store.connection import Connection, translate_errors


class ConfigQueries(Connection):
    """The `config` table: one text value per key."""

    @translate_errors
    def get_config(self, key: str) -> str | None:
        """A stored config value, or None."""
        row = next(iter(self.db.query("select value from config where key = ?", [key])), None)
        return row["value"] if row else None

    @translate_errors
    def set_config(self, key: str, value: str | None) -> None:
        """Store a config value (None deletes it)."""
        with self.write():
            if value is None:
                self.db.execute("delete from config where key = ?", [key])
            else:
                self.db["config"].upsert({"key": key, "value": value}, pk="key")

    @translate_errors
    def all_config(self) -> dict[str, str]:
        """Every stored config value."""
        return {row["key"]: row["value"] for row in self.db.query("select * from config order by key")}
