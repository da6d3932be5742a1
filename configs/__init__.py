"""The shipped YAML configs. This file makes `configs/` the package `tokenpaint.configs` (see setup.cfg), so that the
configs install with the library; find them with `tokenpaint.resources.config_path`."""
