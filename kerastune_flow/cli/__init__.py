"""The command line's parsers beyond train's: evaluate, predict and export."""
