"""The SSE gateway and HTTP API (`cdc-dashboard serve`)."""
