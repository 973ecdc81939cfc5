"""The balance service: users' money on a double-entry ledger in PostgreSQL, served over gRPC."""
