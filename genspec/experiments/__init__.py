"""Stage 8, many runs: one run end to end, studies (stacked seeds), tuning with Ax, and the
reproduction ledger.
"""
