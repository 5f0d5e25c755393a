import kvpool  # noqa: F401  (turns gRPC's fork support off before any service loads grpc)
