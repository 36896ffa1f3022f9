"""Benchmarks reachable as `mmkv bench NAME` (scripts in benchmarks/ call these too)."""
