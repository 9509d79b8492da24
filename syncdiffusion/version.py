"""The package's version, readable by the package and its pipeline alike (the pipeline writes it
into every file it saves)."""

__version__ = "0.1.0"
