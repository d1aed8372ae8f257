"""Gateway: the Open Inference Protocol v2 endpoint, fleet routing and rollout API."""
