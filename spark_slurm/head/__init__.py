"""The head node: merge of node ledgers into the cluster ledger, witness, audit,
replay, the cluster store, tariff and plot (one package, one concept per module)."""
