"""Receive: the C-STORE SCP, its receiver processes, the spool and header parsing (PS3.4 Annex B)."""
