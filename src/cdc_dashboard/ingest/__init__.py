"""Payment ingestion: provider webhooks (Paystack, M-Pesa) parsed, authenticated and recorded in the tables.

`wire` turns request bodies into plain values, `paystack` and `mpesa` read each provider's payloads,
`sources` decides which callers may speak for M-Pesa, and `recording` writes one webhook in one transaction.
"""
