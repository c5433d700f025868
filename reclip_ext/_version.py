"""The one place the release number lives: the build reads it for the package metadata and the
compiled module, and both Python packages re-export it."""
__version__ = "0.1.0"
