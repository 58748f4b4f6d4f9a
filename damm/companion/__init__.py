"""The browser companion: a static page that inspects a profile and never carries the tunnel."""
