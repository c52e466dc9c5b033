"""Database layer: typed ORM models, engine and session handling, migrations."""
