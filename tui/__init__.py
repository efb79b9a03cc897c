"""The Textual dashboard (installed as splitnode.tui)."""
