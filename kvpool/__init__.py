"""kvpool: a distributed KV-cache store for LLM inference.

gRPC's fork support stays off in every kvpool process, set here before anything loads grpc (the
`services` package imports this one first). With it on, grpc registers at-fork handlers, and
those run in any child forked with a `preexec_fn`, which is how Ray starts its GCS server: a
child forked while our store's or gateway's gRPC threads were busy died before it could exec, and
`ray.init` waited for a port file that never came (3 of 14 `kvpool serve` starts under CI load,
none of 8 with it off). We never use gRPC across a fork: our child processes are spawned.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
