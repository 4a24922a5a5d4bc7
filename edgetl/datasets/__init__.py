"""Converters from published data-set formats into the ImageFolder layout edgetl trains on."""
