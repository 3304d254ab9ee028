"""flowstate-forwarder: the per-POP daemon that pins flows and tunnels them to backends."""
