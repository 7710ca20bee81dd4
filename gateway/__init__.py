"""The HTTP front door (`emofleet serve`): POST a clip, get its emotions, over the same Kafka pipeline.

How a result reaches the waiting request (any replica answers any request, whichever processor scored it):

1. The gateway authenticates the key (tenant), rate-limits it (a token bucket per key in Redis, shared by all
   replicas), refuses new work with 503 while the processor group's lag is above a bound, and spools the body
   to disk while hashing it.
2. Uploaded audio already scored is answered from the processors' Redis cache, without Kafka (cache.py).
3. Otherwise the request gets a unique result id, which is also its reference's ``audio_id``; a waiter is
   registered on this replica (bounded: ``max_waiting``, else 503), a ``pending`` record with the tenant goes to
   Redis, the audio to the uploads store, and the AudioReference is produced with acks=all. From here on the
   request is accepted: it lands in the results or dead-letter topic and in ClickHouse whatever happens to the
   gateway.
4. Every replica reads every partition of the results and dead-letter topics from their end (reader.py: manual
   ``assign()``, no group, no commits) and decodes only messages whose key a local waiter wants. The replica
   holding the waiter builds the answer, stores it in Redis (for ``GET /v1/results/{id}`` on any replica) and
   resolves the handler's future: 200, or 422 with the dead letter's reason.
5. A synchronous request waits up to ``sync_wait_seconds``, then answers 504 with ``Location``; the waiter keeps
   waiting up to ``async_wait_seconds`` so a late result is still stored. ``Prefer: respond-async`` answers 202
   at once. A gateway restart loses only waiters: ``GET`` falls back to ClickHouse (results.py).
"""
