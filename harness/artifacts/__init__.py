"""Compile-cache artifacts (SPEC §6): pack cache roots on a warm host, serve them, install them once
per target host after every chunk, the id and each tar member are checked."""
