"""Simulators for acqhost: POS terminals (acqhost-terminal), a bank system (acqhost-bank) and
a load tester."""
