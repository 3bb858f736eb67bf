"""Simulators for acqhost: POS terminals, a bank system, and a load tester (to come)."""
