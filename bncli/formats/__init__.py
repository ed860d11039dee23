"""One module per file format, each owning its structure checks and its reader; the pickle machine in its own."""
