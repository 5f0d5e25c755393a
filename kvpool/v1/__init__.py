"""Generated gRPC stubs for the kvpool.v1 wire contracts (proto/kvpool/v1/*.proto).

Everything else in this package is written by `proto/generate.sh` (`make proto`); do not edit it
by hand. A test regenerates the stubs and fails when they differ from the committed ones.
"""
