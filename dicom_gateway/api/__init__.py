"""The HTTP API: health, jobs and studies."""
