"""Model monitoring: data drift, prediction drift and accuracy from feedback.

Requests are sampled on the event loop (sampler.py, a few rows copied, no
statistics); detectors run on a background thread (monitor.py) with scipy;
figures leave the process as Prometheus metrics (exporter.py) and through the
MonitoringService gRPC service (convoy/api/monitoring.py). DESIGN §9.
"""
