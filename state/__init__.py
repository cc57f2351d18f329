"""The store: peewee models of desired spec and observed status, and the functions the
API, the reconciler and the CLI use to read and write them. Only this package imports
peewee."""
