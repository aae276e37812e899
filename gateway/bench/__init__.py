"""`moe-serve bench`: a load generator against a running moe-serve (or any OpenAI-compatible) server.

    dataset (prompts + output lengths) ─┐
    arrivals (Poisson / gamma offsets) ─┼→ runner (asyncio, warm-up, bounds) → client (HTTP | gRPC)
                                        │                                     → RequestRecord per request
                                        └→ metrics (summary, goodput) → report (table) / JSON / plot (PNG)

Only `runner` and the clients do I/O; dataset, arrivals and metrics are pure functions of their
arguments (and a seed), so the unit tests check them without a server.
"""
