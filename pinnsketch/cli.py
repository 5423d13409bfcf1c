"""The `pinnsketch` command line: a thin layer over the library."""
