"""Head-node internals shared by merge, witness, audit and replay (proofs over the
merged ledger). The public entry points are the top-level modules `merge`,
`witness`, `audit`, `replay`, `headdb`, `tariff` and `plot`."""
