"""JSON Schemas of manifest kinds (data, read by nanod.manifests)."""
