"""Send: the C-STORE SCU and the sender loop (retries with back-off, dead letter)."""
