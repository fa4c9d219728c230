"""Serving: requests that arrive at different times share one fused decode step.

One module per concern: ``request`` (what a client asks for and what it gets back), ``slots``
(the host-side slot table and Flover's move map), ``scheduler`` (admission, buckets, window
sizes: pure policy), ``kernels`` (the jitted decode / prefill / chunk / compaction programs),
``engine`` (one iteration at a time, on a clock it is given), ``async_engine`` (the engine on
a thread, for asyncio callers), ``metrics`` (Prometheus text) and ``http`` (the
OpenAI-compatible server).
"""
