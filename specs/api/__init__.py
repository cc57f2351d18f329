"""JSON Schemas of API request bodies (data, read by specs.validate)."""
