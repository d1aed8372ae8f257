"""Edge runtime: supervises a local tritonserver, heartbeats, learns from local traffic."""
