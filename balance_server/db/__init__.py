"""Database adapters: pools, the serializable-retry helper, migrations, the embedded server."""
