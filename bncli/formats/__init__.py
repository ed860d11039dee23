"""One module per file format, each owning its structure checks and its reader."""
