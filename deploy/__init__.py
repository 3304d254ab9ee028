"""Deployment tools of flowstate: Redis Cluster scripts, backend set-up, the anycast lab."""
