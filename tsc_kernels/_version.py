"""The package's version, in a module of its own so that modules the package imports (``_info``) can read it."""
__version__ = "0.1.0"  # pyproject.toml's [project] version
