"""The gateway's Prometheus metrics (the seed's set), in a registry of its own, served at ``/metrics``.

=========================================  =====================  ==============================================
name                                       labels                 meaning
=========================================  =====================  ==============================================
emofleet_http_requests_total               route, status          answered requests
emofleet_http_request_seconds (histogram)  route                  request received -> answer sent
emofleet_http_in_flight_requests                                  requests being handled now
emofleet_gateway_waiting_requests                                 accepted requests awaiting a result (the queue)
emofleet_gateway_cache_answers_total       outcome                hit (answered from the cache) / miss
emofleet_gateway_pipeline_lag_messages                            the processor group's lag on the audio topic
emofleet_gateway_rejections_total          reason                 429 rate_limited, 503 saturated, ...
=========================================  =====================  ==============================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from emofleet.core.metrics import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("emofleet_http_requests_total", "Answered HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.request_seconds = Histogram("emofleet_http_request_seconds", "Request received to answer sent",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("emofleet_http_in_flight_requests", "Requests being handled",
                               registry=self.registry)
        self.waiting = Gauge("emofleet_gateway_waiting_requests", "Accepted requests awaiting a result",
                             registry=self.registry)
        self.cache_answers = Counter("emofleet_gateway_cache_answers_total", "Cache lookups of uploaded audio",
                                     ["outcome"], registry=self.registry)
        self.pipeline_lag = Gauge("emofleet_gateway_pipeline_lag_messages",
                                  "Processor group lag on the audio topic", registry=self.registry)
        self.rejections = Counter("emofleet_gateway_rejections_total", "Requests refused before any work, by reason",
                                  ["reason"], registry=self.registry)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
