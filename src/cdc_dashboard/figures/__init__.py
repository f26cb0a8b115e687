"""The figures dashboards read (`reads`) and their recomputation from the ledger (`rebuild`)."""
