"""The rules of the business: cards, crypto, settlement-account changes, audit, vouchers.

Pure functions over a store transaction: no event loop, no sockets, no logging set-up.
"""
