"""Everything that persists: records, the writer, the SQLite store and the Redis hot view."""
