"""Tools around the commands: the end-to-end demo and the configuration reference."""
