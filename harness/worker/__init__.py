"""The worker side: build a card from a model dir, serve its metadata, register it (SPEC §2.5, §3)."""
