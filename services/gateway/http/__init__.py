"""The gateway's OpenAI-compatible HTTP API: a second face on the same `InferenceCore`.

`app` holds the routes (Starlette), `schemas` the request models and response shapes, `errors`
the one map from kvpool's exception tree to HTTP statuses and OpenAI's error body, `bridge` the
step from the event loop to the core's blocking stream (and a client's disconnect to its
`cancelled` event), `server` runs it all under uvicorn next to the gRPC server. None of these
modules imports torch: the gateway process stays torch-free.
"""
