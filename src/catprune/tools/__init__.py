"""Tools on top of the library: command-line subcommands, measurement, evaluation, figures."""
