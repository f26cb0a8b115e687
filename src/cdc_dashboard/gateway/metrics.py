"""The gateway's Prometheus metrics, on a registry of its own per app (tests run several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

__all__ = ["GatewayMetrics"]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # RSS and open file descriptors: what a connection costs is read off these.
        ProcessCollector(registry=self.registry)
        self.open_streams = Gauge("cdc_gateway_open_streams", "SSE streams currently open", registry=self.registry)
        self.events_sent = Counter(
            "cdc_gateway_events_sent", "events written to streams (live and replayed)", registry=self.registry
        )
        self.events_replayed = Counter(
            "cdc_gateway_events_replayed",
            "events replayed after Last-Event-ID",
            registry=self.registry,
        )
        self.resyncs_sent = Counter(
            "cdc_gateway_resyncs_sent", "resync events sent for a Last-Event-ID past retention", registry=self.registry
        )
        self.slow_clients_dropped = Counter(
            "cdc_gateway_slow_clients_dropped", "streams cut because the client stopped reading", registry=self.registry
        )
        self.streams_rejected = Counter(
            "cdc_gateway_streams_rejected",
            "streams refused with 503 (connection limit or draining)",
            ["reason"],
            registry=self.registry,
        )
        self.rejected_requests = Counter(
            "cdc_gateway_rejected_requests",
            "requests refused (4xx, 503), by reason (gateway/rejections.py lists them)",
            ["reason"],
            registry=self.registry,
        )
        self.listen_reconnects = Counter(
            "cdc_gateway_listen_reconnects", "reconnects of the gateway's LISTEN connection", registry=self.registry
        )
        self.event_lag = Gauge(
            "cdc_gateway_event_lag_seconds",
            "listener lag: from the event's append to its dispatch by this gateway, for the latest event",
            registry=self.registry,
        )
        self.database_up = Gauge(
            "cdc_database_up",
            "1 when this scrape could read the database, 0 when not (the gauges read at scrape are then NaN)",
            registry=self.registry,
        )
        self.listener_backlog = Gauge(
            "cdc_listener_backlog",
            "captured changes not yet turned into events (read at scrape; exact up to 10000, above that an upper "
            "bound from the ids at both ends of the change log)",
            registry=self.registry,
        )
        self.listener_lag = Gauge(
            "cdc_listener_lag_seconds",
            "age of the oldest captured change not yet turned into an event, 0 when none (read at scrape)",
            registry=self.registry,
        )
        self.listener_heartbeat_age = Gauge(
            "cdc_listener_heartbeat_age_seconds",
            "time since the listener's last heartbeat (read at scrape)",
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "cdc_dead_letters",
            "changes the listener set aside in dashboard.dead_letters, waiting for `cdc-dashboard dead-letters "
            "retry` or `discard` (read at scrape)",
            registry=self.registry,
        )
        # Figures pushed with live events (gateway/pushed_figures.py): one read per batch of events that has a
        # business with a stream here, whatever the number of streams, businesses and events in it.
        self.figures_reads = Counter(
            "cdc_gateway_figures_reads",
            "reads of the dashboard-stats figures pushed with live events (one statement per batch of events)",
            registry=self.registry,
        )
        self.figures_read_failures = Counter(
            "cdc_gateway_figures_read_failures",
            "figures reads that failed or timed out (that batch's events went out without figures)",
            registry=self.registry,
        )
        self.figures_pushed = Counter(
            "cdc_gateway_figures_pushed",
            "events dispatched with their business's figures (counted once per event, not per stream)",
            registry=self.registry,
        )
        self.figures_withheld = Counter(
            "cdc_gateway_figures_withheld",
            "events sent without figures because the figures read was older than the event",
            registry=self.registry,
        )
        self.position = Gauge(
            "cdc_gateway_position", "id of the last event this gateway dispatched", registry=self.registry
        )
