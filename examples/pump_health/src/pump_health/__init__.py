"""An example fedgate model package: pump fault classification (see README.md)."""
