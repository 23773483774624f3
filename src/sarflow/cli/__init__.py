"""The `sarflow` command line, one thin module per command group (a door: the library never
imports it)."""
