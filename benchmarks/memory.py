"""Bytes per flow of the local flow table and of Redis (being written)."""
