"""The ``hydraopt`` command line: one module per subcommand, each parses, builds a config and calls
the library."""
