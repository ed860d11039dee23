"""One module per subcommand: each defines COMMAND (Typer's arguments) and run (parse -> core -> render)."""
