"""Package home of the data registries; pyproject maps the top-level models/ and devices/ folders here."""
