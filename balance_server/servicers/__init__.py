"""One module per gRPC service. Servicers only translate: proto -> command -> ledger -> proto."""
