"""`sparkctl demo`: the whole system on one machine, scenarios asserted end to end."""
