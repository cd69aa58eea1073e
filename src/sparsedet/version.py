"""The package version, in a module of its own so that the modules that record it (checkpoints,
exported files, benchmark rows) need not import the package's ``__init__``, which sits above them."""
__version__ = "0.1.0"
